"""Prefix attention: the exact pattern, the sampling range, and causality through encoder + decoder."""

import torch

from aimv2.models import AIMv2, get_size
from aimv2.models.encoder import build_encoder
from aimv2.models.masks import prefix_attention_bias, prefix_attention_mask, sample_prefix_lengths


def test_prefix_mask_exact_pattern():
    mask = prefix_attention_mask(torch.tensor([2, 4]), 5)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected_m2 = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    expected_m4 = torch.tensor([
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected_m2)
    assert torch.equal(mask[1, 0], expected_m4)


def test_prefix_bias_is_the_mask_as_zero_or_minus_inf():
    lengths = torch.tensor([2, 4])
    mask, bias = prefix_attention_mask(lengths, 5), prefix_attention_bias(lengths, 5)
    assert bias.shape == (2, 1, 5, 5) and bias.dtype == torch.float32
    assert torch.equal(bias == 0, mask) and bool(torch.isneginf(bias[~mask]).all())
    assert prefix_attention_bias(lengths, 5, torch.bfloat16).dtype == torch.bfloat16


def test_encoder_with_bias_equals_boolean_mask():
    torch.manual_seed(0)
    encoder = build_encoder(get_size("debug"), 56).eval()
    images, lengths = torch.randn(3, 3, 56, 56), torch.tensor([1, 7, 15])
    with torch.no_grad():
        by_mask = encoder.forward_features(images, attn_mask=prefix_attention_mask(lengths, 16))
        by_bias = encoder.forward_features(images, attn_mask=prefix_attention_bias(lengths, 16))
    torch.testing.assert_close(by_bias, by_mask, atol=1e-6, rtol=1e-5)


def test_prefix_lengths_cover_one_to_n_minus_one():
    gen = torch.Generator().manual_seed(0)
    lengths = sample_prefix_lengths(20_000, 6, generator=gen)
    assert lengths.min() == 1 and lengths.max() == 5
    counts = torch.bincount(lengths, minlength=6)[1:].float()
    assert (counts / counts.sum() - 0.2).abs().max() < 0.02  # uniform over {1..5}


def _model():
    torch.manual_seed(0)
    return AIMv2(get_size("debug"), img_size=56, vocab_size=50, max_text_len=6).eval()  # 4x4 = 16 patches


def _perturb_patch(images, j, grid=4, p=14):
    out = images.clone()
    r, c = divmod(j, grid)
    out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += torch.randn(images.shape[0], 3, p, p)
    return out


@torch.no_grad()
def test_perturbing_a_patch_leaves_earlier_non_prefix_outputs_unchanged():
    model = _model()
    images, tokens = torch.randn(1, 3, 56, 56), torch.randint(0, 50, (1, 6))
    prefix = torch.tensor([4])
    j = 9  # a non-prefix patch
    base_pix, base_txt = model(images, tokens, prefix)
    pix, txt = model(_perturb_patch(images, j), tokens, prefix)
    # Decoder position i predicts patch i+1 from encoder outputs 0..i: positions < j must not move.
    assert torch.allclose(pix[:, :j], base_pix[:, :j], atol=1e-6)
    assert not torch.allclose(pix[:, j:], base_pix[:, j:], atol=1e-4)
    assert not torch.allclose(txt, base_txt, atol=1e-4)  # text sees the whole image


@torch.no_grad()
def test_prefix_patches_see_each_other_and_inference_is_bidirectional():
    model = _model()
    images, tokens = torch.randn(1, 3, 56, 56), torch.randint(0, 50, (1, 6))
    perturbed = _perturb_patch(images, 2)
    # Inside a prefix of 4, patch 2 reaches position 0 (bidirectional prefix block).
    a, _ = model(images, tokens, torch.tensor([4]))
    b, _ = model(perturbed, tokens, torch.tensor([4]))
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-5)
    # With prefix 1 it does not (causal beyond the prefix).
    a, _ = model(images, tokens, torch.tensor([1]))
    b, _ = model(perturbed, tokens, torch.tensor([1]))
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)
    # Without a mask (inference) the encoder is fully bidirectional: patch 2 reaches feature 0.
    fa = model.encoder.forward_features(images)
    fb = model.encoder.forward_features(perturbed)
    assert not torch.allclose(fa[:, 0], fb[:, 0], atol=1e-5)
