"""The size ladder: one table for every model this project trains.

Encoder rows follow timm's `aimv2_*` definitions (patch 14, SwiGLU, RMSNorm, no biases); the small
rows reuse the same architecture at toy widths so that CPU runs and tests exercise the real code.
The decoder is shared across the paper's sizes (width 1024, 12 blocks, 8 heads; AIMv2 paper) and
shrunk only for the small rows.

Training FLOPs of one AIMv2 sample, for throughput and MFU figures.

Convention (PaLM appendix B, nanoGPT's estimate_mfu): a matmul with P weights applied to T tokens
costs 2*P*T FLOPs forward and twice that backward, so 6*P*T per training step; attention adds
12*T^2*D per layer (QK^T and AV, forward + backward), counted over the full T x T square even where
a causal or prefix mask leaves half of it unused. Embedding lookups, norms, activations and the
optimizer are not counted. Only useful work counts: the vocabulary head is charged for the real
caption tokens, not the padding, so an implementation that runs it over padding gets no credit.
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


def block_matmul_params(width: int, mlp_hidden: int) -> int:
    """qkv (3 D^2) + attention output (D^2) + SwiGLU fc1, fc3 (2 D H) and fc2 (H D); no biases."""
    return 4 * width * width + 3 * width * mlp_hidden


def training_flops_per_sample(
    spec: SizeSpec, img_size: int, text_len: int, text_tokens: float, vocab_size: int
) -> dict[str, float]:
    """FLOPs of forward + backward for one (image, caption) pair.

    text_len: decoder text positions (start token + caption positions, padding included: the decoder
    runs over them); text_tokens: the real caption tokens the vocabulary head is charged for.
    """
    p = spec.patch_size
    n = (img_size // p) ** 2  # encoder tokens
    t = n + text_len  # decoder tokens
    patch_dim = p * p * 3
    encoder = 6 * n * (patch_dim * spec.width + spec.depth * block_matmul_params(spec.width, spec.mlp_hidden))
    encoder_attention = 12 * spec.depth * n * n * spec.width
    decoder = 6 * (
        n * spec.width * spec.decoder_width
        + t * spec.decoder_depth * block_matmul_params(spec.decoder_width, spec.decoder_mlp_hidden)
    )
    decoder_attention = 12 * spec.decoder_depth * t * t * spec.decoder_width
    heads = 6 * spec.decoder_width * (n * patch_dim + text_tokens * vocab_size)
    parts = {
        "encoder": encoder,
        "encoder_attention": encoder_attention,
        "decoder": decoder,
        "decoder_attention": decoder_attention,
        "heads": heads,
    }
    parts["total"] = float(sum(parts.values()))
    return parts


def encoder_flops_per_sample(spec: SizeSpec, img_size: int) -> float:
    """Training FLOPs of the encoder alone (as for a stock ViT trained without the decoder)."""
    parts = training_flops_per_sample(spec, img_size, 0, 0, 0)
    return float(parts["encoder"] + parts["encoder_attention"])
