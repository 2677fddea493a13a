"""Writers for `aimv2 export`: this project's format, a timm directory, a transformers directory.

| format | files | loads with |
|--------|-------|------------|
| aimv2  | encoder.safetensors, config.json (+ decoder.safetensors) | `aimv2.load_encoder(dir)` |
| timm   | model.safetensors, config.json (`save_for_hf`) | `timm.create_model('local-dir:DIR', pretrained=True)` |
| hf     | model.safetensors, config.json, preprocessor_config.json | `Aimv2VisionModel.from_pretrained(dir)` |

Every export is a directory written under a temporary name beside its destination and renamed
into place at the end (aimv2.fileio.atomic_directory): an interrupted export leaves nothing under
the final name.

A native-resolution encoder (aimv2.models.native: 2-D sin-cos positions, any grid) exports as one
wherever the format can say so: `aimv2` records `native` in its recipe and `hf` writes
`is_native: true` (transformers computes the same sin-cos table per image; no position weights).
timm's aimv2 has no sin-cos option, so `timm` gets a learned `pos_embed` equal to the table at the
nominal grid plus `dynamic_img_size=True`, and timm resamples that table (bicubic) for other grids:
exact at the nominal size only. Off it the resampled table is the sin-cos one stretched over the new
grid (the native encoder takes the table's first rows and columns instead), another encoding rather
than an approximation: for a 70 x 126 px image (5 x 9 grid) through a 224 px (16 x 16) export of a
random debug-size encoder the table differs by up to 1.96 (it lies in [-1, 1]) and the features by up
to 2.78, a 42 % per-token error (tests/test_native_export.py). Export with `hf` to keep native
resolution outside this package.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from safetensors.torch import save_file
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer

from aimv2.checkpoints.arch import TimmRecipe, encoder_dims
from aimv2.checkpoints.convert import native_to_learned, timm_to_hf
from aimv2.checkpoints.formats import EXPORT_FORMAT
from aimv2.checkpoints.loading import LoadedEncoder, load_checkpoint, read_decoder
from aimv2.checkpoints.preprocessing import Preprocessing
from aimv2.errors import UserError
from aimv2.fileio import atomic_directory
from aimv2.models.native import is_native

EXPORT_FORMATS = ("aimv2", "timm", "hf")


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def write_aimv2(
    out: Path,
    encoder: VisionTransformer,
    pre: Preprocessing,
    recipe: TimmRecipe,
    decoder: tuple[dict, dict] | None = None,
    source: dict | None = None,
) -> None:
    """encoder.safetensors (timm layout) + config.json (timm recipe, preprocessing, decoder arguments)."""
    save_file(
        {k: v.contiguous() for k, v in encoder.state_dict().items()},
        out / "encoder.safetensors",
        metadata={"format": "pt"},
    )
    config = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "timm": recipe.as_dict(),
        "preprocessing": pre.as_dict(),
        "source": source or {},
    }
    if decoder is not None:
        state, kwargs = decoder
        save_file({k: v.contiguous() for k, v in state.items()}, out / "decoder.safetensors", metadata={"format": "pt"})
        config["decoder"] = kwargs
    _write_json(out / "config.json", config)


def write_timm(out: Path, encoder: VisionTransformer, pre: Preprocessing, recipe: TimmRecipe) -> None:
    """timm's own directory layout, written by timm (config.json records `architecture` and `model_args`)."""
    if is_native(encoder):
        size = encoder.patch_embed.img_size[0]
        warnings.warn(
            f"timm format: the native-resolution encoder is exact at {size} px only; timm resamples its "
            "position table for other sizes (--format hf or aimv2 keep native resolution)",
            stacklevel=2,
        )
        encoder, recipe = learned_table_encoder(encoder, recipe)
    save_for_hf(
        encoder, str(out), model_args=dict(recipe.kwargs), safe_serialization=True, data_config=pre.timm_data_config()
    )


def learned_table_encoder(encoder: VisionTransformer, recipe: TimmRecipe) -> tuple[VisionTransformer, TimmRecipe]:
    """A native encoder as plain timm can build it (module docstring): the same weights plus its sin-cos
    table at the nominal grid as a learned `pos_embed`, with dynamic_img_size=True so any grid passes."""
    plain = TimmRecipe(recipe.name, {**recipe.kwargs, "dynamic_img_size": True})
    model = plain.build(empty=True)
    state = native_to_learned(encoder.state_dict(), encoder.patch_embed.grid_size)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), plain


def hf_config(encoder: VisionTransformer, where: str = "encoder") -> dict:
    """An `Aimv2VisionConfig` as JSON: no pooling head (the trunk only, its last_hidden_state after the
    final RMSNorm as forward_features); a learned position embedding, or `is_native` for a native
    encoder (image_size is then its nominal size)."""
    d = encoder_dims(encoder, where)
    return {
        "architectures": ["Aimv2VisionModel"],
        "model_type": "aimv2_vision_model",
        "hidden_size": d["width"],
        "intermediate_size": d["mlp_hidden"],
        "num_hidden_layers": d["depth"],
        "num_attention_heads": d["heads"],
        "num_channels": 3,
        "image_size": d["img_size"],
        "patch_size": d["patch_size"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "qkv_bias": False,
        "mlp_bias": False,
        "use_head": False,
        "is_native": d["native"],
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def write_hf(out: Path, encoder: VisionTransformer, pre: Preprocessing) -> None:
    """config.json + model.safetensors for `Aimv2VisionModel.from_pretrained`, and a CLIPImageProcessor config."""
    config = hf_config(encoder)
    save_file(
        {k: v.contiguous() for k, v in timm_to_hf(encoder.state_dict()).items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", pre.hf_processor_config())


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    fmt: str,
    *,
    img_size: int | None = None,
    with_decoder: bool = False,
    overwrite: bool = False,
    heads: int | None = None,
) -> LoadedEncoder:
    """Load any checkpoint `load_encoder` reads and write it to `out` in `fmt` (one of EXPORT_FORMATS)."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if with_decoder and fmt != "aimv2":
        raise UserError(f"--with-decoder: the {fmt} format holds an encoder only; the decoder goes with --format aimv2")
    out = Path(out)
    if out.exists() and not overwrite:  # fail before the (possibly long) load
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    loaded = load_checkpoint(source, img_size, heads=heads)
    decoder = read_decoder(loaded) if with_decoder else None
    if with_decoder and decoder is None:
        raise UserError(f"{loaded.raw.path}: --with-decoder, but this {loaded.raw.format} checkpoint holds no decoder")
    with atomic_directory(out, overwrite) as tmp:
        if fmt == "aimv2":
            write_aimv2(
                tmp,
                loaded.encoder,
                loaded.preprocessing,
                loaded.recipe,
                decoder,
                {"path": str(loaded.raw.path), "format": loaded.raw.format},
            )
        elif fmt == "timm":
            write_timm(tmp, loaded.encoder, loaded.preprocessing, loaded.recipe)
        else:
            write_hf(tmp, loaded.encoder, loaded.preprocessing)
    return loaded
