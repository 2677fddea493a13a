"""The size ladder, parity with timm, and the decoder's shapes."""

import pytest
import timm
import torch

from aimv2.errors import UserError
from aimv2.models import SIZES, AIMv2, get_size
from aimv2.models.encoder import build_encoder, encode, timm_encoder_kwargs

# The AIMv2 paper's encoder sizes (arXiv 2411.14402), counted as timm's aimv2_{large,huge,1b,3b}_patch14_224 have them.
PAPER_ENCODER_PARAMS_M = {"large": 309.2, "huge": 680.9, "1b": 1235.0, "3b": 2720.7}


@pytest.mark.parametrize("size", PAPER_ENCODER_PARAMS_M)
def test_paper_encoder_parameter_counts(size):
    with torch.device("meta"):
        encoder = build_encoder(get_size(size), 224)
    params = sum(p.numel() for p in encoder.parameters())
    assert round(params / 1e6, 1) == PAPER_ENCODER_PARAMS_M[size]
    assert encoder.patch_embed.num_patches == 256


@pytest.mark.parametrize("size", PAPER_ENCODER_PARAMS_M)
def test_paper_sizes_are_timm_aimv2_architectures(size):
    spec = get_size(size)
    with torch.device("meta"):
        ours = build_encoder(spec, 224)
        theirs = timm.create_model(spec.timm_arch, pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_paper_decoder_is_shared_and_small_sizes_are_small():
    decoders = {
        (s.decoder_width, s.decoder_depth, s.decoder_heads, s.decoder_mlp_hidden)
        for s in (SIZES[n] for n in PAPER_ENCODER_PARAMS_M)
    }
    assert decoders == {(1024, 12, 8, 2816)}
    for name in ("debug", "tiny", "small"):
        assert SIZES[name].width <= 384 and SIZES[name].patch_size == 14


def test_unknown_size_is_a_user_error():
    with pytest.raises(UserError, match="model.size"):
        get_size("gigantic")


@torch.no_grad()
def test_encoder_at_inference_equals_timm_with_same_weights():
    spec = get_size("debug")
    torch.manual_seed(0)
    model = AIMv2(spec, img_size=112, vocab_size=100).eval()
    reference = timm.create_model(spec.timm_arch, pretrained=False, **timm_encoder_kwargs(spec, 112)).eval()
    reference.load_state_dict(model.encoder.state_dict())
    images = torch.randn(2, 3, 112, 112)
    ours = encode(model.encoder, images)  # no prefix: no mask
    assert torch.allclose(ours, reference.forward_features(images), atol=1e-6)
    # A prefix covering everything but the last patch differs only where causality bites.
    masked = encode(model.encoder, images, torch.tensor([63, 63]))
    assert not torch.allclose(masked, ours, atol=1e-5)


def test_forward_shapes_and_gradients():
    torch.manual_seed(0)
    model = AIMv2(get_size("debug"), img_size=56, vocab_size=30, max_text_len=7)
    images, tokens = torch.randn(3, 3, 56, 56), torch.randint(0, 30, (3, 7))
    pixels, logits = model(images, tokens, torch.tensor([1, 5, 15]))
    assert pixels.shape == (3, 16, 14 * 14 * 3) and logits.shape == (3, 7, 30)
    (pixels.square().mean() + logits.logsumexp(-1).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_encoder_rejects_image_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_encoder(get_size("debug"), 100)


@torch.no_grad()
def test_masked_text_head_returns_the_real_positions_only():
    torch.manual_seed(0)
    model = AIMv2(get_size("debug"), img_size=28, vocab_size=30, max_text_len=5).eval()
    images, tokens = torch.randn(2, 3, 28, 28), torch.randint(0, 30, (2, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    prefix = torch.tensor([1, 2])
    _, full = model(images, tokens, prefix)
    _, packed = model(images, tokens, prefix, mask)
    assert packed.shape == (6, 30) and torch.allclose(packed, full[mask], atol=1e-6)
    # Flat indices computed on the host (the collator's token_index: 0, 1 | 5, 6, 7, 8) pack the same rows.
    index = torch.tensor([0, 1, 5, 6, 7, 8])
    _, by_index = model(images, tokens, prefix, text_index=index)
    assert torch.equal(by_index, packed)
