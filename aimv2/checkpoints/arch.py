"""Which timm model a checkpoint's weights belong to: a `TimmRecipe` (name + keyword arguments).

Sources say it in different ways: this project's checkpoints name a row of the size table, timm's
config.json has `architecture` + `model_args`, transformers' config.json has `hidden_size` & co,
and a bare state dict (Apple's release) only has tensor shapes, from which everything but the
number of heads follows; the heads come from the size table row with the same shapes.

A native-resolution encoder (aimv2.models.native: fixed 2-D sin-cos positions, any patch grid) is
the same timm model with another patch embedding and no `pos_embed`; its recipe says `native=True`
(config.json keeps only JSON, so `build()` adds the non-JSON arguments) and `img_size` is then only
its nominal size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from aimv2.errors import UserError
from aimv2.models.encoder import timm_encoder_kwargs
from aimv2.models.native import NATIVE_TIMM_KWARGS, is_native
from aimv2.models.sizes import SIZES, SizeSpec

_REGISTERED_RESOLUTIONS = (224, 336, 448)  # timm registers aimv2_{large,huge,1b,3b}_patch14_{224,336,448}


@dataclass(frozen=True)
class TimmRecipe:
    """How to build the encoder: `timm.create_model(name, pretrained=False, **kwargs)`; with native=True
    as aimv2.models.native.build_native_encoder does (sin-cos patch embedding, no pos_embed, any grid)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    native: bool = False

    def build(self, empty: bool = False) -> VisionTransformer:
        """The model; with empty=True its tensors are on the meta device (no memory, no random init):
        for loading weights with `load_state_dict(..., assign=True)`, which a 3B encoder needs."""
        kwargs = self.kwargs | (self._native_kwargs() if self.native else {})
        try:
            if empty:
                with torch.device("meta"):
                    return timm.create_model(self.name, pretrained=False, **kwargs)
            return timm.create_model(self.name, pretrained=False, **kwargs)
        except Exception as err:
            raise UserError(f"cannot build timm model {self.name!r} with {self.kwargs}: {err}") from None

    def _native_kwargs(self) -> dict:
        """build_native_encoder's arguments."""
        width = self.kwargs.get("embed_dim", 0)
        if width % 4:
            raise UserError(
                f"native timm model {self.name!r}: width {width} is not divisible by 4, "
                "which a 2-D sin-cos position embedding needs"
            )
        return dict(NATIVE_TIMM_KWARGS)

    def as_dict(self) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs), "native": self.native}


def _timm_name(spec: SizeSpec, img_size: int) -> str:
    """The registered timm name for a paper size at this resolution when there is one (so users can
    write `timm.create_model('aimv2_large_patch14_336', ...)`); else the size's own architecture."""
    if spec.name in ("large", "huge", "1b", "3b") and img_size in _REGISTERED_RESOLUTIONS:
        return spec.timm_arch.replace("_224", f"_{img_size}")
    return spec.timm_arch


def recipe_from_size(spec: SizeSpec, img_size: int, native: bool = False) -> TimmRecipe:
    """Exactly what `aimv2.models.encoder.build_encoder(spec, img_size)` builds (native:
    `aimv2.models.native.build_native_encoder(spec, img_size)`)."""
    return TimmRecipe(_timm_name(spec, img_size), timm_encoder_kwargs(spec, img_size), native)


def recipe_from_dims(
    width: int,
    depth: int,
    heads: int | None,
    mlp_hidden: int,
    patch_size: int,
    img_size: int,
    where: str,
    native: bool = False,
) -> TimmRecipe:
    """From the encoder's dimensions; with heads=None they come from the size-table row of these shapes."""
    row = next(
        (
            s
            for s in SIZES.values()
            if (s.width, s.depth, s.mlp_hidden, s.patch_size) == (width, depth, mlp_hidden, patch_size)
            and heads in (None, s.heads)
        ),
        None,
    )
    if row is None:
        if heads is None:
            raise UserError(
                f"{where}: width {width}, depth {depth}, MLP {mlp_hidden} match no row of the size table, "
                "so the number of attention heads is unknown; pass heads=N to load_encoder"
            )
        row = SizeSpec("custom", "aimv2_large_patch14_224", width, depth, heads, mlp_hidden, 0, 0, 0, 0, patch_size)
    return recipe_from_size(row, img_size, native)


def recipe_from_shapes(state_dict: dict, where: str, heads: int | None = None) -> TimmRecipe:
    """From a timm-layout state dict's shapes (patch conv, position embedding, blocks, MLP)."""
    need = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1_g.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise UserError(
            f"{where}: cannot tell the encoder's architecture: no {', '.join(missing)} (and no config describing it)"
        )
    width, _, patch, _ = state_dict["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    tokens = state_dict["pos_embed"].shape[-2]  # (1, N, D)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"{where}: position embedding of {tokens} tokens is not a square grid")
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp_hidden = state_dict["blocks.0.mlp.fc1_g.weight"].shape[0]  # (hidden, D)
    return recipe_from_dims(int(width), depth, heads, int(mlp_hidden), int(patch), side * int(patch), where)


def hf_vision_config(config: dict) -> dict:
    """The vision part of a transformers config.json (a full `Aimv2Model` nests it under vision_config)."""
    return config.get("vision_config", config) if config.get("model_type") == "aimv2" else config


def recipe_from_hf_config(config: dict, where: str) -> TimmRecipe:
    """From an `Aimv2VisionConfig` (defaults are transformers' own: the AIMv2-L/224 values); `is_native`
    gives a native encoder (image_size is then only the nominal size)."""
    cfg = hf_vision_config(config)
    if cfg.get("qkv_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{where}: qkv_bias/mlp_bias=true is not the AIMv2 architecture (no biases); not supported")
    if abs(float(cfg.get("rms_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise UserError(f"{where}: rms_norm_eps={cfg['rms_norm_eps']}; AIMv2 encoders use 1e-5")
    if cfg.get("num_channels", 3) != 3:
        raise UserError(f"{where}: num_channels={cfg['num_channels']}; only RGB encoders are supported")
    size, patch = cfg.get("image_size", 224), cfg.get("patch_size", 14)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return recipe_from_dims(
        int(cfg.get("hidden_size", 1024)),
        int(cfg.get("num_hidden_layers", 24)),
        int(cfg.get("num_attention_heads", 8)),
        int(cfg.get("intermediate_size", 2816)),
        int(patch),
        int(size),
        where,
        bool(cfg.get("is_native", False)),
    )


def recipe_from_timm_config(config: dict, where: str) -> TimmRecipe:
    """From timm's own config.json (`architecture`, `model_args`, `num_classes`)."""
    if "architecture" not in config:
        raise UserError(f"{where}: timm config.json without 'architecture'")
    kwargs = dict(config.get("model_args") or {})
    kwargs.setdefault("num_classes", config.get("num_classes", 0))
    return TimmRecipe(config["architecture"], kwargs)


def encoder_dims(model: VisionTransformer, where: str = "encoder") -> dict:
    """width/depth/heads/mlp_hidden/patch_size/img_size/native of an AIMv2-architecture timm encoder, or a
    UserError saying why it is not one (other ViTs have no transformers Aimv2 equivalent). img_size is
    a native encoder's nominal size."""
    block = model.blocks[0]
    aimv2_like = (
        hasattr(block.mlp, "fc1_g")
        and block.attn.qkv.bias is None
        and model.num_prefix_tokens == 0
        and type(model.norm).__name__ == "RmsNorm"
        and (model.pos_embed is not None or is_native(model))
    )
    if not aimv2_like:
        raise UserError(f"{where}: not an AIMv2-architecture encoder (SwiGLU, RMSNorm, no biases, no class token)")
    return {
        "width": model.embed_dim,
        "depth": len(model.blocks),
        "heads": block.attn.num_heads,
        "mlp_hidden": block.mlp.fc1_g.out_features,
        "patch_size": model.patch_embed.patch_size[0],
        "img_size": model.patch_embed.img_size[0],
        "native": is_native(model),
    }
