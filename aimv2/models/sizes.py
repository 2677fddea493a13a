"""The size ladder: one table for every model this project trains.

Encoder rows follow timm's `aimv2_*` definitions (patch 14, SwiGLU, RMSNorm, no biases); the small
rows reuse the same architecture at toy widths so that CPU runs and tests exercise the real code.
The decoder is shared across the paper's sizes (width 1024, 12 blocks, 8 heads; AIMv2 paper) and
shrunk only for the small rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from aimv2.errors import UserError


@dataclass(frozen=True)
class SizeSpec:
    name: str
    timm_arch: str  # the timm model function whose architecture (and checkpoint layout) we use
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_hidden: int
    patch_size: int = 14

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.width

    @property
    def decoder_mlp_ratio(self) -> float:
        return self.decoder_mlp_hidden / self.decoder_width


_PAPER_DECODER = dict(decoder_width=1024, decoder_depth=12, decoder_heads=8, decoder_mlp_hidden=2816)

SIZES: dict[str, SizeSpec] = {
    spec.name: spec
    for spec in (
        # Toy sizes: `debug` trains in seconds on a laptop CPU; `tiny`/`small` for CPU benchmarks.
        SizeSpec("debug", "aimv2_large_patch14_224", 64, 2, 2, 176, 64, 2, 2, 176),
        SizeSpec("tiny", "aimv2_large_patch14_224", 192, 6, 3, 512, 192, 4, 3, 512),
        SizeSpec("small", "aimv2_large_patch14_224", 384, 6, 6, 1024, 384, 4, 6, 1024),
        # The paper's sizes (AIMv2 Table 1 / timm's aimv2_* functions).
        SizeSpec("large", "aimv2_large_patch14_224", 1024, 24, 8, 2816, **_PAPER_DECODER),
        SizeSpec("huge", "aimv2_huge_patch14_224", 1536, 24, 12, 4096, **_PAPER_DECODER),
        SizeSpec("1b", "aimv2_1b_patch14_224", 2048, 24, 16, 5632, **_PAPER_DECODER),
        SizeSpec("3b", "aimv2_3b_patch14_224", 3072, 24, 24, 8192, **_PAPER_DECODER),
    )
}


def get_size(name: str) -> SizeSpec:
    try:
        return SIZES[name]
    except KeyError:
        raise UserError(f"model.size: unknown size {name!r}; choose one of {', '.join(SIZES)}") from None
