"""Training FLOPs of one AIMv2 sample, for throughput and MFU figures.

Convention (PaLM appendix B, nanoGPT's estimate_mfu): a matmul with P weights applied to T tokens
costs 2*P*T FLOPs forward and twice that backward, so 6*P*T per training step; attention adds
12*T^2*D per layer (QK^T and AV, forward + backward), counted over the full T x T square even where
a causal or prefix mask leaves half of it unused. Embedding lookups, norms, activations and the
optimizer are not counted. Only useful work counts: the vocabulary head is charged for the real
caption tokens, not the padding, so an implementation that runs it over padding gets no credit.
"""

from __future__ import annotations

from aimv2.models.sizes import SizeSpec


def block_matmul_params(width: int, mlp_hidden: int) -> int:
    """qkv (3 D^2) + attention output (D^2) + SwiGLU fc1, fc3 (2 D H) and fc2 (H D); no biases."""
    return 4 * width * width + 3 * width * mlp_hidden


def training_flops_per_sample(spec: SizeSpec, img_size: int, text_len: int, text_tokens: float,
                              vocab_size: int) -> dict[str, float]:
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
    decoder = 6 * (n * spec.width * spec.decoder_width
                   + t * spec.decoder_depth * block_matmul_params(spec.decoder_width, spec.decoder_mlp_hidden))
    decoder_attention = 12 * spec.decoder_depth * t * t * spec.decoder_width
    heads = 6 * spec.decoder_width * (n * patch_dim + text_tokens * vocab_size)
    parts = {"encoder": encoder, "encoder_attention": encoder_attention, "decoder": decoder,
             "decoder_attention": decoder_attention, "heads": heads}
    parts["total"] = float(sum(parts.values()))
    return parts


def encoder_flops_per_sample(spec: SizeSpec, img_size: int) -> float:
    """Training FLOPs of the encoder alone (as for a stock ViT trained without the decoder)."""
    parts = training_flops_per_sample(spec, img_size, 0, 0, 0)
    return float(parts["encoder"] + parts["encoder_attention"])
