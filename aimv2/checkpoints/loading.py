"""`load_encoder(source)`: a ready timm encoder and its preprocessing from any checkpoint format.

The weights go through one strict check: a mismatch is a one-line error listing the missing,
unexpected and mis-shaped keys, never a silently half-initialized encoder.

A pre-training checkpoint as the whole AIMv2 model (encoder and decoder), read through the same
loader as every encoder (aimv2.checkpoints.loading): `aimv2 visualize` draws from it, and it reads every
format that holds the decoder -- this project's .ckpt, a ZeRO directory, an `aimv2 export
--with-decoder` directory -- with the same strict key check.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from aimv2.checkpoints.arch import (
    TimmRecipe,
    hf_vision_config,
    recipe_from_hf_config,
    recipe_from_shapes,
    recipe_from_size,
    recipe_from_timm_config,
)
from aimv2.checkpoints.convert import apple_names_to_timm, apple_to_timm, hf_to_timm, module_to_timm, strip_prefix
from aimv2.checkpoints.formats import RawCheckpoint, read_checkpoint
from aimv2.checkpoints.preprocessing import Preprocessing
from aimv2.errors import UserError
from aimv2.models.aimv2 import AIMv2
from aimv2.models.decoder import MultimodalDecoder, decoder_kwargs
from aimv2.models.sizes import SIZES, get_size


@dataclass
class LoadedEncoder:
    encoder: VisionTransformer  # eval mode, fp32, CPU
    preprocessing: Preprocessing
    recipe: TimmRecipe  # builds this encoder at its current resolution
    trained_size: int  # the resolution of the weights in the file
    raw: RawCheckpoint


def load_encoder(
    source: str | Path, img_size: int | None = None, *, heads: int | None = None
) -> tuple[VisionTransformer, Preprocessing]:
    """(timm VisionTransformer in eval mode on the CPU, its eval preprocessing) from any checkpoint:
    this project's .ckpt, a DeepSpeed ZeRO or DCP (fsdp2) directory, an `aimv2 export` directory, a timm or
    transformers directory, or Apple's ml-aim release. `img_size` (a multiple of the patch size)
    resamples the position embedding to another resolution (a native-resolution encoder takes any
    grid as it is: there img_size only sets the nominal size, see resize_encoder); `heads` is needed
    only for a bare state dict whose shapes match no row of the size table.

    Native-resolution encoders (aimv2.models.native; `is_native` tells) come from a pre-training
    checkpoint with `model.native: true`, an `aimv2` export of one, or a transformers config with
    `is_native: true`."""
    loaded = load_checkpoint(source, img_size, heads=heads)
    return loaded.encoder, loaded.preprocessing


def load_checkpoint(source: str | Path, img_size: int | None = None, *, heads: int | None = None) -> LoadedEncoder:
    """`load_encoder` with everything it found: the recipe, the trained resolution and the raw checkpoint."""
    raw = read_checkpoint(source)
    state, recipe, pre = _encoder_parts(raw, heads)
    encoder = recipe.build(empty=True)  # meta tensors: the weights come from the file
    if raw.format == "apple":
        state = apple_to_timm(state, encoder)
    _load_strict(encoder, state, raw, recipe)
    del state
    # Keep only what read_decoder may still need: the encoder's tensors now live in the model.
    raw.tensors = {k: v for k, v in raw.tensors.items() if "model.decoder." in k}
    encoder.eval()
    trained = int(encoder.patch_embed.img_size[0])
    pre = pre.with_size(trained)
    if img_size:
        resize_encoder(encoder, img_size, str(raw.path))
        recipe = replace(recipe, kwargs={**recipe.kwargs, "img_size": img_size})
        pre = pre.with_size(img_size)
    return LoadedEncoder(encoder, pre, recipe, trained, raw)


def resize_encoder(encoder: VisionTransformer, img_size: int, where: str = "encoder") -> None:
    """Set another input resolution; timm resamples the position embedding (bicubic, as its loader does).

    A native encoder has no table to resample (its sin-cos positions are exact on every grid): only
    its nominal size moves (patch_embed.img_size / grid_size, which callers such as the compress
    attachments read for the grid they will feed), so its features on any image are unchanged. The
    size must still be a positive multiple of the patch size: the images fed at it are."""
    patch = encoder.patch_embed.patch_size[0]
    if img_size <= 0 or img_size % patch:
        raise UserError(f"img_size={img_size} does not fit {where}: not a positive multiple of its patch size {patch}")
    if img_size != encoder.patch_embed.img_size[0]:
        encoder.set_input_size(img_size=(img_size, img_size))


def _drop_head(state: dict, where: str) -> dict:
    """LiT-style attention-pooling heads are not part of the encoder trunk that timm's aimv2 models hold."""
    head = [k for k in state if k.startswith("head.")]
    if head:
        warnings.warn(
            f"{where}: dropped the attention-pooling head ({len(head)} tensors); "
            "pooled features are the mean of the patch tokens",
            stacklevel=3,
        )
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _encoder_parts(raw: RawCheckpoint, heads: int | None) -> tuple[dict, TimmRecipe, Preprocessing]:
    """(timm-layout state dict -- Apple's is converted later by timm's filter --, recipe, preprocessing
    with a placeholder size) for each format."""
    where, cfg = str(raw.path), raw.config
    if raw.format in ("lightning", "zero", "dcp"):
        state = module_to_timm(raw.tensors)
        model = cfg.get("model") if isinstance(cfg.get("model"), dict) else None
        if model is None:
            return state, recipe_from_shapes(state, where, heads), Preprocessing(0)
        try:
            spec = get_size(str(model.get("size")))
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        native = bool(model.get("native", False))  # absent in checkpoints from before native resolution
        return state, recipe_from_size(spec, int(model.get("img_size", 224)), native), Preprocessing(0)
    if raw.format == "aimv2":
        try:
            return raw.tensors, TimmRecipe(**cfg["timm"]), Preprocessing.from_dict(cfg["preprocessing"])
        except (KeyError, TypeError) as err:
            raise UserError(f"{where}/config.json: missing or malformed entry {err}") from None
    if raw.format == "timm":
        recipe = recipe_from_timm_config(cfg, where) if cfg else recipe_from_shapes(raw.tensors, where, heads)
        return raw.tensors, recipe, Preprocessing.from_timm_cfg(cfg.get("pretrained_cfg", {}), 0)
    if raw.format == "hf":
        state = _drop_head(hf_to_timm(raw.tensors), where)  # is_native: no position weights, a native recipe
        recipe = recipe_from_hf_config(cfg, where) if cfg else recipe_from_shapes(state, where, heads)
        pre = Preprocessing.from_hf_processor(raw.preprocessor, 0) if raw.preprocessor else Preprocessing(0)
        return state, recipe, pre
    state = _drop_head(raw.tensors, where)  # apple
    recipe = (
        recipe_from_hf_config(cfg, where)
        if "hidden_size" in hf_vision_config(cfg)
        else recipe_from_shapes(apple_names_to_timm(state), where, heads)
    )
    return state, recipe, Preprocessing(0)


def listing(keys: list[str], limit: int = 5) -> str:
    """The first `limit` keys, and how many more: for one-line errors about state dicts."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _native_hint(recipe: TimmRecipe, missing: list[str], unexpected: list[str]) -> str:
    """A native encoder has no `pos_embed`: when that key alone tells the config and the weights apart, say so."""
    if recipe.native and "pos_embed" in unexpected:
        return (
            "; the config says native resolution (sin-cos positions, no pos_embed) but the weights hold a "
            "learned position table"
        )
    if not recipe.native and "pos_embed" in missing:
        return (
            "; weights without a position table are a native-resolution encoder's, which the config does not "
            "say (model.native / is_native)"
        )
    return ""


def key_differences(module: torch.nn.Module, state: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of `state` against `module`'s state dict; mis-shaped ones
    as "key (file shape) vs (module shape)"."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return missing, unexpected, mis_shaped


def _load_strict(encoder: VisionTransformer, state: dict, raw: RawCheckpoint, recipe: TimmRecipe) -> None:
    missing, unexpected, mis_shaped = key_differences(encoder, state)
    if missing or unexpected or mis_shaped:
        parts = [
            f"{label} {len(keys)} keys [{listing(keys)}]"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
            if keys
        ]
        raise UserError(
            f"{raw.path}: {raw.format} weights do not fit the {recipe.name} encoder: "
            + "; ".join(parts)
            + _native_hint(recipe, missing, unexpected)
        )
    # fp32 on the CPU whatever the file holds (releases are often bf16); assign: the meta tensors are replaced.
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    if left:  # a buffer outside the state dict: not an architecture this loader knows
        raise UserError(f"{raw.path}: the {recipe.name} encoder has tensors no checkpoint holds: {listing(left)}")


def read_decoder(loaded: LoadedEncoder) -> tuple[dict, dict] | None:
    """(decoder state dict, MultimodalDecoder keyword arguments) when the checkpoint holds the
    pre-training decoder (this project's .ckpt, ZeRO or DCP directory, or export with decoder), else None."""
    raw = loaded.raw
    if raw.format == "aimv2" and raw.decoder_file is not None and "decoder" in raw.config:
        from aimv2.checkpoints.safe_io import load_safetensors

        return load_safetensors(raw.decoder_file), dict(raw.config["decoder"])
    if raw.format in ("lightning", "zero", "dcp") and isinstance(raw.config.get("model"), dict):
        state = strip_prefix({k.removeprefix("_forward_module."): v for k, v in raw.tensors.items()}, "model.decoder.")
        if not state:
            return None
        spec = get_size(str(raw.config["model"]["size"]))
        return state, decoder_kwargs(spec, int(raw.config["vocab_size"]), int(raw.config["max_text_len"]))
    return None


@dataclass
class Pretrained:
    model: AIMv2  # eval mode, fp32, CPU
    loaded: LoadedEncoder  # what the loader found: preprocessing, recipe, raw checkpoint (its step)

    @property
    def step(self) -> int | None:
        return self.loaded.raw.step


def _decoder(loaded: LoadedEncoder, purpose: str) -> MultimodalDecoder:
    found = read_decoder(loaded)
    if found is None:
        raise UserError(f"{loaded.raw.path}: holds no pre-training decoder ({loaded.raw.format} format){purpose}")
    state, kwargs = found
    decoder = MultimodalDecoder(**kwargs)
    decoder.load_state_dict(state, strict=True)
    return decoder.eval()


def load_decoder(source: str | Path) -> torch.nn.Module:
    """The pre-training decoder (`MultimodalDecoder`, eval mode) of a checkpoint that has one."""
    return _decoder(load_checkpoint(source), "")


def load_pretrained(source: str | Path) -> Pretrained:
    """The AIMv2 model (eval mode) of a checkpoint that holds the decoder, else a UserError naming it."""
    loaded = load_checkpoint(source)
    decoder = _decoder(
        loaded, ": an `aimv2 pretrain` checkpoint, or an export made with --with-decoder, holds the whole model"
    )
    model_cfg = loaded.raw.config.get("model") if isinstance(loaded.raw.config, dict) else None
    spec = SIZES.get(str(model_cfg.get("size"))) if isinstance(model_cfg, dict) else None
    return Pretrained(AIMv2.from_parts(loaded.encoder, decoder, spec).eval(), loaded)
