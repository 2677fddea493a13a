"""`model.init_from`: start a new run from an earlier checkpoint's weights, for the paper's 336 and
448 px stages, which continue the 224 px run on 2B more pairs (AIMv2, arXiv 2411.14402).

This is not a resume. A resume continues the same run: weights, optimizer moments, schedule, step
counter and data position all come back. A new stage is a new run that only starts from the
previous weights: its optimizer, learning-rate schedule (warmup included), step counter (0) and data
stream start fresh, and it may change the resolution and the recipe (weight decay 0).

What is taken from the checkpoint:
- the encoder, from anything `aimv2.load_encoder` reads (this project's .ckpt, ZeRO directories,
  exports, timm / transformers / Apple layouts); its learned position embedding (1, N, D) is
  resampled to `model.img_size` by timm (bicubic), exactly as `load_encoder(img_size=...)` does;
- the decoder, when the checkpoint holds one (a pre-training .ckpt or ZeRO directory, or an
  `aimv2 export --format aimv2 --with-decoder` directory); otherwise it starts from random init.
  Nothing in the decoder is sized by the number of image tokens: image positions reach it only
  through the encoder's features (which carry the resampled position embedding) and its causal
  attention works for any length; its one position table, `text_pos_embed`, covers the caption
  (`data.tokenizer.max_length`), so a decoder fits at any resolution. The vocabulary and caption
  length must match the run's tokenizer.

A native-resolution run (model.native) continues a fixed-size one the same way, except that its
encoder's positions are the fixed 2-D sin-cos embedding: the learned table stays behind.

Anything that does not fit (another size, another tokenizer) is one UserError listing it; nothing
is half-loaded. When the run resumes from its own checkpoint, `init_from` is ignored: the resumed
weights win, and the log says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aimv2.checkpoints.arch import encoder_dims
from aimv2.checkpoints.loading import LoadedEncoder, key_differences, listing, load_checkpoint, read_decoder
from aimv2.config import ModelConfig
from aimv2.errors import UserError
from aimv2.models.aimv2 import AIMv2
from aimv2.models.native import is_native

KEY = "model.init_from"


def apply_init_from(model: AIMv2, cfg: ModelConfig, resume: str | None) -> list[str]:
    """Load `cfg.init_from` into `model` (before any strategy wraps it) unless the run resumes.
    Returns the lines to print on rank 0 (what was loaded, or why nothing was)."""
    if not cfg.init_from:
        return []
    if resume is not None:
        return [
            f"{KEY}={cfg.init_from} ignored: the run resumes from {resume} (its weights, optimizer, "
            "step and data position win)"
        ]
    source = Path(cfg.init_from)
    if not source.exists():
        raise UserError(f"config key '{KEY}': checkpoint not found: {source}")
    return init_from_checkpoint(model, source)


def init_from_checkpoint(model: AIMv2, source: str | Path) -> list[str]:
    """Copy the encoder (position embedding resampled to the model's resolution) and, when present,
    the decoder of `source` into `model`; a UserError lists everything that does not fit."""
    try:
        loaded = load_checkpoint(source, model.img_size, heads=model.spec.heads)
    except UserError as err:
        raise UserError(f"{KEY}: {err}") from None
    decoder = read_decoder(loaded)
    problems = _encoder_problems(model, loaded)
    if decoder is not None:
        problems += [f"decoder {p}" for p in _state_problems(model.decoder, decoder[0])]
    if problems:
        raise UserError(f"{KEY}: {loaded.raw.path} does not fit model.size={model.spec.name}: " + "; ".join(problems))
    with torch.no_grad():
        model.encoder.load_state_dict(_encoder_state(model, loaded), strict=True)
        if decoder is not None:
            model.decoder.load_state_dict(decoder[0], strict=True)
    return _describe(model, loaded, decoder is not None)


def _encoder_problems(model: AIMv2, loaded: LoadedEncoder) -> list[str]:
    """The architecture first (one readable line for another size), then key by key."""
    try:
        found = encoder_dims(loaded.encoder, str(loaded.raw.path))
    except UserError as err:
        return [str(err)]
    spec = model.spec
    wanted = {
        "width": spec.width,
        "depth": spec.depth,
        "heads": spec.heads,
        "mlp_hidden": spec.mlp_hidden,
        "patch_size": spec.patch_size,
    }
    differ = [f"{k} {found[k]} vs {v}" for k, v in wanted.items() if found[k] != v]
    problems = [f"encoder {', '.join(differ)} (checkpoint vs config)"] if differ else []
    if not differ:  # same dimensions: a key-level mismatch would be a bug worth naming
        problems += [f"encoder {p}" for p in _state_problems(model.encoder, _encoder_state(model, loaded))]
    return problems


def _encoder_state(model: AIMv2, loaded: LoadedEncoder) -> dict[str, torch.Tensor]:
    """The checkpoint's encoder weights for `model`: a native encoder (2-D sin-cos positions, fixed)
    continuing a fixed-size run leaves that run's learned position table behind."""
    state = loaded.encoder.state_dict()
    if is_native(model.encoder):
        state.pop("pos_embed", None)
    return state


def _state_problems(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped keys of `state` against `module`, as short phrases."""
    missing, unexpected, mis_shaped = key_differences(module, state)
    return [
        f"{label} {len(keys)} [{listing(keys, 4)}]"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
        if keys
    ]


def _describe(model: AIMv2, loaded: LoadedEncoder, with_decoder: bool) -> list[str]:
    patch = model.spec.patch_size
    trained, now = loaded.trained_size, model.img_size
    where = f"{loaded.raw.path} ({loaded.raw.format})"
    if is_native(model.encoder):
        replaced = (
            ""
            if is_native(loaded.encoder)
            else f"; its learned position table ({(trained // patch) ** 2} tokens) is replaced by the native "
            "2-D sin-cos embedding, which serves any grid"
        )
        encoder = f"{KEY}: encoder from {where} trained at {trained} px{replaced}"
    elif trained == now:
        encoder = f"{KEY}: encoder from {where} at {trained} px ({(trained // patch) ** 2} tokens), as trained"
    else:
        encoder = (
            f"{KEY}: encoder from {where} trained at {trained} px ({(trained // patch) ** 2} tokens) -> "
            f"position embedding resampled to {now} px ({(now // patch) ** 2} tokens)"
        )
    decoder = (
        f"{KEY}: decoder loaded from the same checkpoint"
        if with_decoder
        else f"{KEY}: decoder not present in this {loaded.raw.format} checkpoint, so it starts fresh (random init)"
    )
    return [
        encoder,
        decoder,
        f"{KEY}: optimizer, learning-rate schedule (warmup included), step counter and data stream start fresh",
    ]
