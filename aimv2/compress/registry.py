"""The compressor registry: a `compressor.kind` name -> its class; one call builds any of them."""

from __future__ import annotations

from aimv2.compress.base import Compressor, CompressorSpec
from aimv2.compress.projector import MLPProjector, PooledProjector
from aimv2.compress.prune import KDVPruner
from aimv2.compress.region import QueCC, TokenPacker
from aimv2.compress.resampler import Resampler
from aimv2.errors import UserError

COMPRESSORS: dict[str, type[Compressor]] = {
    "mlp": MLPProjector,  # LLaVA-1.5, M = N
    "pool": PooledProjector,  # Matryoshka / LDPv2: avg-pool to sqrt(M) x sqrt(M) + MLP
    "resampler": Resampler,  # Flamingo's Perceiver Resampler: M learned latents attend over [patches; latents]
    "tokenpacker": TokenPacker,  # pooled grid queries attend to their own region (+ residual)
    "quecc": QueCC,  # text-conditioned depthwise-conv queries attend to their own region (k/v without text, no residual)
    "kdv": KDVPruner,  # training-free key-diversity pruning to M, then the MLP
}


def compressor_class(kind: str) -> type[Compressor]:
    try:
        return COMPRESSORS[kind]
    except KeyError:
        raise UserError(f"config key 'compressor.kind': unknown compressor {kind!r} "
                        f"(one of {', '.join(COMPRESSORS)})") from None


def build_compressor(spec: CompressorSpec) -> Compressor:
    """A fresh compressor; M = 0 in the spec means all N patches (what `mlp` keeps)."""
    if spec.num_tokens == 0:
        spec = CompressorSpec(**(spec.to_dict() | {"grid": spec.grid, "num_tokens": spec.num_patches}))
    return compressor_class(spec.kind)(spec)
