"""The pre-training model starts as ml-l3m's AIMv2 config initializes it (aimv2/models/init.py): the
bounds and spreads of every kind of weight against the formulas, on the small size."""

import math

import pytest
import torch

from aimv2.models import AIMv2, get_size

SPEC = get_size("small")  # width 384, encoder depth 6, decoder depth 4
D, DEC = SPEC.width, SPEC.decoder_width


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AIMv2(SPEC, 56, vocab_size=500, max_text_len=8)


def uniform_check(w: torch.Tensor, bound: float) -> None:
    assert w.abs().max().item() <= bound * (1 + 1e-6)
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # the std of U(-b, b)


def test_blocks_are_xavier_uniform_with_q_k_v_as_separate_matrices(model):
    for blocks, width in ((model.encoder.blocks, D), (model.decoder.blocks, DEC)):
        for block in blocks:
            for part in block.attn.qkv.weight.detach().chunk(3):  # each (W, W): bound sqrt(6 / 2W)
                uniform_check(part, math.sqrt(6 / (2 * width)))
            uniform_check(block.attn.proj.weight.detach(), math.sqrt(6 / (2 * width)))
            hidden = block.mlp.fc2.weight.shape[1]
            for linear in (block.mlp.fc1_g, block.mlp.fc1_x, block.mlp.fc2):  # the gate too: no 1e-6 start
                uniform_check(linear.weight.detach(), math.sqrt(6 / (width + hidden)))


def test_patch_projection_embeddings_and_tokens(model):
    uniform_check(model.encoder.patch_embed.proj.weight.detach(), math.sqrt(6 / (D + 3 * 14 * 14)))
    assert model.encoder.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    dec = model.decoder
    assert dec.text_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert dec.text_pos_embed.std().item() == pytest.approx(0.01, rel=0.1)  # 8 x 384 values
    uniform_check(dec.image_proj.weight.detach(), 1 / math.sqrt(D))  # PyTorch's Linear default


def test_heads_are_fan_in_depth_scaled(model):
    dec = model.decoder
    std = math.sqrt(1 / (1 + len(dec.blocks)) / DEC)  # variance scale / fan_in; 1/13 for the paper's decoder
    for head in (dec.pixel_head, dec.text_head):
        w = head.weight.detach()
        assert w.std().item() == pytest.approx(std, rel=0.03)
        assert w.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-9  # truncated at 2 sigma


def test_norms_start_at_one(model):
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
