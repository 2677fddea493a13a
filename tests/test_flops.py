"""Training FLOP counts (the numerator of every MFU figure) against hand counts."""

import pytest

from aimv2.models.sizes import block_matmul_params, encoder_flops_per_sample, get_size, training_flops_per_sample


def test_debug_size_by_hand():
    spec = get_size("debug")  # width 64, depth 2, SwiGLU 176; decoder 64 wide, 2 blocks, 176
    n, text_len = 4, 5  # 28 px / 14 -> 2 x 2 patches; the decoder runs 4 + 5 = 9 tokens
    block = 4 * 64 * 64 + 3 * 64 * 176  # 16384 + 33792 = 50176
    assert block_matmul_params(64, 176) == block == 50176
    flops = training_flops_per_sample(spec, 28, text_len, text_tokens=3, vocab_size=100)
    assert flops["encoder"] == 6 * n * (588 * 64 + 2 * 50176)  # patch projection + 2 blocks = 3311616
    assert flops["encoder_attention"] == 12 * 2 * 16 * 64  # 12 * depth * N^2 * D = 24576
    assert flops["decoder"] == 6 * (4 * 64 * 64 + 9 * 2 * 50176)  # image projection + 2 blocks over 9 tokens
    assert flops["decoder_attention"] == 12 * 2 * 81 * 64
    assert flops["heads"] == 6 * 64 * (4 * 588 + 3 * 100)  # pixel head on 4 patches, vocab head on 3 real tokens
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")


def test_large_encoder_matches_the_6_params_tokens_rule():
    spec = get_size("large")
    # 24 blocks of 4 D^2 + 3 D H with D=1024, H=2816 plus the patch projection: 308.9M matmul weights
    # (timm's 309.2M adds the position embedding and the norms).
    weights = 24 * (4 * 1024**2 + 3 * 1024 * 2816) + 588 * 1024
    assert weights == pytest.approx(308.88e6, rel=1e-4)
    # Forward FLOPs per image at 224 px: 2 * weights * 256 + attention 4 * 24 * 256^2 * 1024 = 164.6 G,
    # within 2% of open_clip's profile of ViT-L/14 (162 G; its GELU MLP is slightly smaller).
    forward = encoder_flops_per_sample(spec, 224) / 3
    assert forward == pytest.approx(164.59e9, rel=1e-4)
    assert forward == pytest.approx(162e9, rel=0.02)
