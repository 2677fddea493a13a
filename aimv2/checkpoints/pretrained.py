"""A pre-training checkpoint as the whole AIMv2 model (encoder and decoder), read through the same
loader as every encoder (aimv2.checkpoints.loading): `aimv2 visualize` draws from it, and it reads every
format that holds the decoder -- this project's .ckpt, a ZeRO directory, an `aimv2 export
--with-decoder` directory -- with the same strict key check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from aimv2.checkpoints.loading import LoadedEncoder, load_checkpoint, read_decoder
from aimv2.errors import UserError
from aimv2.models.aimv2 import AIMv2
from aimv2.models.decoder import MultimodalDecoder
from aimv2.models.sizes import SIZES


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
