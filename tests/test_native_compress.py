"""Compressors on a native-resolution encoder: the visual tokens of an image at any size (here
70 x 126 px, a 5 x 9 grid, the compressors trained for the nominal 4 x 4) from every kind that can
take another grid, and a one-line error from the kinds whose weights or M are tied to the grid."""

import pytest
import torch

from aimv2.compress.base import CompressorSpec, pool_tokens
from aimv2.compress.components import build_compressor
from aimv2.compress.vlm import AttachedVLM
from aimv2.errors import UserError
from aimv2.models import get_size
from aimv2.models.native import build_native_encoder

D_LLM = 32


def vlm(kind: str, m: int) -> AttachedVLM:
    torch.manual_seed(0)
    encoder = build_native_encoder(get_size("debug"), img_size=56).eval()  # nominal grid 4 x 4
    spec = CompressorSpec(kind, encoder.embed_dim, D_LLM, (4, 4), m, heads=2)
    return AttachedVLM(encoder, build_compressor(spec), None)


@pytest.mark.parametrize(
    "kind,m,expected", [("mlp", 0, 45), ("pool", 4, 4), ("resampler", 4, 4), ("kdv", 4, 4), ("tokenpacker", 1, 1)]
)
def test_every_kind_that_can_takes_a_non_square_grid(kind, m, expected):
    model = vlm(kind, m)
    nominal = model.visual_tokens(torch.randn(2, 3, 56, 56))
    assert nominal.shape == (2, 16 if kind == "mlp" else m, D_LLM)
    tokens = model.visual_tokens(torch.randn(2, 3, 70, 126))  # 5 x 9 patches
    assert tokens.shape == (2, expected, D_LLM) and torch.isfinite(tokens).all()


def test_pooling_follows_the_features_grid():
    x = torch.arange(45, dtype=torch.float32).reshape(1, 45, 1)  # a 5 x 9 grid, row-major
    pooled = pool_tokens(x, (5, 9), 1)
    assert pooled.item() == pytest.approx(22.0)
    model = vlm("pool", 1)
    with pytest.raises(UserError, match="45 patch features do not form a 4x4 grid"):
        model.compressor(torch.randn(1, 45, 64))  # the trained grid assumed: refused, not reshaped wrongly


def test_kinds_tied_to_the_grid_say_so_in_one_line():
    with pytest.raises(UserError, match="compressor.num_tokens.*sqrt\\(M\\)=2 to divide the 5x9"):
        vlm("tokenpacker", 4).visual_tokens(torch.randn(1, 3, 70, 126))
    with pytest.raises(UserError, match="quecc: its depthwise kernel was trained for the 4x4"):
        vlm("quecc", 4).compressor(torch.randn(1, 45, 64), text=torch.randn(1, D_LLM), grid=(5, 9))
