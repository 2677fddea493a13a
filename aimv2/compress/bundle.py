"""`aimv2 compress export` / `aimv2.compress.load_bundle`: the encoder + compressor (+ LM) +
config as one directory that downstream code loads with one call.

    DIR/bundle.json             format, compressor spec, text ids, the attachment's config sections
    DIR/encoder.safetensors     the frozen encoder, with DIR/config.json (timm recipe, preprocessing):
                                DIR is also an `aimv2 export --format aimv2` directory, so
                                `aimv2.load_encoder(DIR)` and `aimv2 probe --checkpoint DIR` read it
    DIR/compressor.safetensors  the trained compressor
    DIR/lm/                     the LM (save_pretrained) when it is not a directory on disk to point at:
                                a random-init LM, or one trained in stage 2

The directory is written under a temporary name beside DIR and renamed into place
(aimv2.fileio.atomic_directory), so a reader never sees half a bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aimv2.checkpoints.arch import TimmRecipe, encoder_dims, recipe_from_dims
from aimv2.checkpoints.export import write_aimv2
from aimv2.compress.base import CompressorSpec
from aimv2.compress.components import build_compressor, freeze
from aimv2.compress.config import LMSection
from aimv2.compress.vlm import AttachedVLM
from aimv2.config import as_section
from aimv2.errors import UserError
from aimv2.fileio import atomic_directory

FORMAT, VERSION = "aimv2-compress-bundle", 1


def encoder_recipe(encoder: torch.nn.Module) -> TimmRecipe:
    """How timm rebuilds this encoder at its current resolution (checkpoint I/O's own recipe)."""
    dims = encoder_dims(encoder, "encoder.source")
    return recipe_from_dims(
        dims["width"],
        dims["depth"],
        dims["heads"],
        dims["mlp_hidden"],
        dims["patch_size"],
        dims["img_size"],
        "encoder.source",
    )


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def export_bundle(module, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the bundle of a trained `CompressModule` to out_dir atomically; an existing out_dir is a
    UserError unless `overwrite` (then it is replaced whole, never half-written)."""
    vlm, source, text, lm_path = module.vlm, module.encoder_cfg.source, module.text_cfg, module.lm_cfg.path
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists (pass --overwrite to replace it)")
    with atomic_directory(out, overwrite=True) as tmp:
        write_aimv2(
            tmp, vlm.encoder, vlm.preprocessing, encoder_recipe(vlm.encoder), source={"compress_bundle_of": source}
        )
        save_file(_tensors(vlm.compressor), tmp / "compressor.safetensors")
        bundle_lm = not lm_path or module.stage == 2
        if bundle_lm:
            vlm.lm.save_pretrained(tmp / "lm", safe_serialization=True)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "encoder": {"source": source, "files": ["encoder.safetensors", "config.json"]},
            "compressor": vlm.compressor.spec.to_dict() | {"num_tokens": vlm.compressor.num_tokens},
            "text": {
                "prefix": text.prefix,
                "prompt": text.prompt,
                "prefix_ids": vlm.prefix_ids.tolist(),
                "prompt_ids": vlm.prompt_ids.tolist(),
            },
            "lm": {"bundled": bundle_lm, "path": lm_path, "hidden_size": vlm.compressor.spec.d_llm},
            "config": module.attachment_config(),
        }
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def read_meta(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / "bundle.json"
    if not path.is_file():
        raise UserError(f"not a compressor bundle (no bundle.json): {bundle_dir}")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise UserError(f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not one this version reads")
    return meta


def load_bundle(bundle_dir: str | Path, lm: bool = True, device: str | torch.device = "cpu") -> AttachedVLM:
    """The attachment of an exported bundle, in eval mode: `vlm.visual_tokens(images)` gives the
    (B, M, D_llm) tokens; with the LM also `vlm.generate(...)`. `lm=False` loads the front end only.
    `vlm.preprocessing` says how to prepare images (resize, crop, mean/std); `vlm.meta` holds bundle.json."""
    from aimv2 import load_encoder

    root = Path(bundle_dir)
    meta = read_meta(root)
    encoder, preprocessing = load_encoder(root)
    spec = CompressorSpec.from_dict(meta["compressor"])
    compressor = build_compressor(spec)
    compressor.load_state_dict(load_file(root / "compressor.safetensors"))
    language_model = _load_lm(root, meta) if lm else None
    vlm = AttachedVLM(
        freeze(encoder),
        compressor,
        language_model,
        meta["text"]["prefix_ids"],
        meta["text"]["prompt_ids"],
        preprocessing,
    ).eval()
    vlm.meta = meta
    return vlm.to(device)


def _load_lm(root: Path, meta: dict):
    from aimv2.compress.components import build_lm

    lm = as_section(LMSection, meta["config"].get("lm"))  # bundles of every version hold config.lm
    if meta["lm"]["bundled"]:
        lm.path = str(root / "lm")
    elif not Path(lm.path).is_dir():
        raise UserError(
            f"bundle {root}: its LM {lm.path!r} is not on this machine; load_bundle(..., lm=False) "
            "loads the front end alone"
        )
    language_model = build_lm(lm, vocab_size=0)
    return freeze(language_model)
