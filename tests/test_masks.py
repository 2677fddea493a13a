"""Prefix attention: the exact pattern, the sampling range, and causality through encoder + decoder; the
FlexAttention block masks of packed rows, block for block those of the dense masks."""

import functools

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from aimv2.data.native import place_rows
from aimv2.models import AIMv2, get_size
from aimv2.models.encoder import build_encoder
from aimv2.models.masks import (
    packed_decoder_block_mask,
    packed_decoder_mask,
    packed_encoder_block_mask,
    packed_encoder_mask,
    prefix_attention_bias,
    prefix_attention_mask,
    sample_prefix_lengths,
    sample_prefix_lengths_per_image,
)
from aimv2.models.native import pack_layout


def test_prefix_mask_exact_pattern():
    mask = prefix_attention_mask(torch.tensor([2, 4]), 5)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected_m2 = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    expected_m4 = torch.tensor(
        [
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
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
    out[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += torch.randn(images.shape[0], 3, p, p)
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


# -- packed rows: FlexAttention block masks built from per-block summaries --------------------------------
def packed_rows(
    seed: int, num_rows: int, row_tokens: int, patches: tuple[int, int], text_len: int, fill: float = 1.0
) -> tuple[dict, torch.Tensor]:
    """A layout of aimv2.models.native for random images of `patches` (lo, hi) patches placed first-fit
    decreasing (longest first in each row, as the native packer does) into `num_rows` rows, each filled
    to about `fill` of its tokens, and each image's prefix length."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while True:
        lengths.append(int(torch.randint(patches[0], patches[1] + 1, (), generator=gen)))
        rows = place_rows(lengths, int(row_tokens * fill))
        if len(rows) > num_rows:
            lengths.pop()
            break
    rows = place_rows(lengths, int(row_tokens * fill))
    grids = [(1, n) for n in lengths]  # the masks depend on patch counts only
    captions = torch.randint(1, text_len + 1, (len(lengths),), generator=gen).tolist()
    layout = pack_layout(grids, captions, rows, row_tokens, text_len)
    return layout, sample_prefix_lengths_per_image(torch.tensor(lengths), generator=gen)


def marked_blocks(num_blocks: torch.Tensor, indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """Boolean (B, H, Qb, Kb): the key blocks a BlockMask lists (partial or full) for each query block."""
    valid = torch.arange(indices.shape[-1]) < num_blocks[..., None]
    dense = torch.zeros(*indices.shape[:-1], kv_blocks + 1, dtype=torch.bool)
    return dense.scatter_(-1, torch.where(valid, indices, kv_blocks).long(), True)[..., :kv_blocks]


def block_reduce(dense: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of a dense (B, H, T, T) mask per block pair, positions past T counting as masked."""
    rows, heads, length, _ = dense.shape
    blocks = -(-length // block)
    pad = blocks * block - length
    counts = torch.nn.functional.pad(dense, (0, pad, 0, pad)).view(rows, heads, blocks, block, blocks, block)
    counts = counts.sum((3, 5))
    return counts > 0, counts == block * block


def block_tokens(blocks: torch.Tensor, block: int, length: int) -> torch.Tensor:
    """A per-block-pair (B, H, Qb, Kb) mask spread over the tokens of its blocks: (B, H, length, length)."""
    return blocks.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :length, :length]


def dense_mask_mod(dense: torch.Tensor):
    """A FlexAttention mask_mod that reads a dense (B, 1, T, T) mask."""
    return lambda b, h, q, k: dense[b, 0, q, k]


def outputs_and_grads(attend, dtype: torch.dtype, qkv: tuple, weight: torch.Tensor) -> list[torch.Tensor]:
    """attend(q, k, v) on copies of q, k, v in dtype: its output and the q/k/v gradients of sum(output * weight)."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in qkv]
    out = attend(*inputs)
    (out.float() * weight).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in inputs]


def built_masks(layout: dict, prefix: torch.Tensor | None, block: int):
    """(name, dense mask, BlockMask) for the encoder with prefix, the encoder at inference, the decoder."""
    image, pos = layout["patch_image"], layout["patch_pos"]
    return [
        ("encoder", packed_encoder_mask(image, pos, prefix), packed_encoder_block_mask(image, pos, prefix, block)),
        (
            "encoder, no prefix",
            packed_encoder_mask(image, pos, None),
            packed_encoder_block_mask(image, pos, None, block),
        ),
        ("decoder", packed_decoder_mask(layout["dec_image"]), packed_decoder_block_mask(layout["dec_image"], block)),
    ]


# (seed, rows, row tokens, patches per image, fill, block): several images per row crossing block
# boundaries, padding, rows of one image, T not a multiple of the block (encoder: 100, 90; decoder always)
LAYOUTS = [
    (0, 3, 100, (2, 40), 0.9, 16),
    (1, 2, 96, (2, 30), 1.0, 8),
    (2, 2, 90, (30, 80), 0.95, 16),
    (3, 4, 64, (2, 64), 1.0, 16),
    (4, 2, 128, (2, 9), 0.8, 8),
]


@pytest.mark.parametrize("seed, rows, tokens, patches, fill, block", LAYOUTS)
def test_packed_block_masks_mark_exactly_the_dense_masks_blocks(seed, rows, tokens, patches, fill, block):
    """Non-empty blocks are the block-level OR of the dense mask, full blocks its all-True ones; where a block
    is partial, mask_mod gives the dense mask elementwise; and create_block_mask (which evaluates mask_mod on
    the whole T x T grid) gives the same BlockMask for the dense mask."""
    layout, prefix = packed_rows(seed, rows, tokens, patches, text_len=6, fill=fill)
    assert layout["patch_image"].shape[0] == rows
    for name, dense, bm in built_masks(layout, prefix, block):
        length = dense.shape[-1]
        kv_blocks = -(-length // block)
        assert bm.shape == (rows, 1, length, length) and bm.BLOCK_SIZE == (block, block), name
        partial = marked_blocks(bm.kv_num_blocks, bm.kv_indices, kv_blocks)
        full = marked_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, kv_blocks)
        visible, all_true = block_reduce(dense, block)
        assert not (partial & full).any(), name
        assert torch.equal(partial | full, visible), name
        assert torch.equal(full, all_true), name

        # what a kernel applies: full blocks as they are, mask_mod inside partial ones, nothing elsewhere
        full_tokens, partial_tokens = block_tokens(full, block, length), block_tokens(partial, block, length)
        elementwise = create_mask(bm.mask_mod, rows, 1, length, length, device="cpu")
        assert torch.equal(full_tokens | (partial_tokens & elementwise), dense), name
        old = create_block_mask(dense_mask_mod(dense), rows, None, length, length, device="cpu", BLOCK_SIZE=block)
        assert torch.equal(bm.to_dense(), old.to_dense()), name
        assert torch.equal(full, marked_blocks(old.full_kv_num_blocks, old.full_kv_indices, kv_blocks)), name
        assert torch.equal(bm.kv_num_blocks, old.kv_num_blocks), name
        assert torch.equal(bm.q_num_blocks, old.q_num_blocks), name  # the backward's transposed lists too


def test_packed_block_masks_skip_blocks_no_query_needs():
    """The decoder lists no key block after its query block; the encoder one only where a shared image's
    prefix reaches into it; rows of one image each hold one diagonal band (hand-made layout)."""
    layout = pack_layout([(1, 20), (1, 12), (1, 30)], [3, 2, 4], [[0, 1], [2]], row_tokens=40, text_len=4)
    dec = packed_decoder_block_mask(layout["dec_image"], block_size=8).to_dense()[:, 0]  # (R, Qb, Kb)
    assert not dec.triu(1).any()
    prefix = torch.tensor([18, 2, 25])  # image 0's prefix (tokens 0..17) reaches block 2; image 2's, block 3
    enc = packed_encoder_block_mask(layout["patch_image"], layout["patch_pos"], prefix, block_size=8).to_dense()[:, 0]
    assert torch.equal(
        enc[0],
        torch.tensor(
            [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.int32
        ),
    )
    assert torch.equal(
        enc[1],
        torch.tensor(
            [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.int32
        ),
    )


@pytest.mark.parametrize("seed, rows, tokens, patches, fill, block", LAYOUTS[:3])
def test_flex_attention_with_packed_block_masks_equals_sdpa_with_the_dense_masks(
    seed, rows, tokens, patches, fill, block
):
    """torch's eager CPU forward of FlexAttention (it applies mask_mod to every pair) against SDPA."""
    layout, prefix = packed_rows(seed, rows, tokens, patches, text_len=6, fill=fill)
    gen = torch.Generator().manual_seed(seed)
    for name, dense, bm in built_masks(layout, prefix, block):
        q, k, v = torch.randn(3, rows, 2, dense.shape[-1], 8, generator=gen).unbind(0)
        out = flex_attention(q, k, v, block_mask=bm)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_compiled_flex_attention_skips_only_blocks_the_dense_masks_do_not_need():
    """The compiled CPU kernel (inductor) visits only the listed blocks and skips mask_mod on full ones: an
    end-to-end check of the block lists against SDPA with the dense masks."""
    layout, prefix = packed_rows(0, 3, 100, (2, 40), text_len=6, fill=0.9)
    compiled = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    for name, dense, bm in built_masks(layout, prefix, 16)[::2]:  # the encoder with prefix, the decoder
        q, k, v = torch.randn(3, 3, 2, dense.shape[-1], 16, generator=gen).unbind(0)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        torch.testing.assert_close(compiled(q, k, v, block_mask=bm), ref, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_flex_attention_with_packed_block_masks_forward_and_backward_on_gpu():
    """The shipped native shapes (2 rows x 4096 tokens, images of 112..4096 patches, captions of 77, block
    128), bf16: the compiled FlexAttention kernels' outputs and q/k/v gradients are as close to the fp32
    reference (SDPA, dense masks) as bf16 SDPA with the same masks is."""
    device = torch.device("cuda")
    layout, prefix = packed_rows(0, 2, 4096, (112, 4096), text_len=77)
    layout, prefix = {k: t.to(device) for k, t in layout.items()}, prefix.to(device)
    compiled = torch.compile(flex_attention)
    gen = torch.Generator(device).manual_seed(0)
    for name, dense, bm in built_masks(layout, prefix, 128)[::2]:
        q, k, v = torch.randn(3, 2, 8, dense.shape[-1], 64, device=device, generator=gen).unbind(0)
        weight = torch.randn(q.shape, device=device, generator=gen)
        run = functools.partial(outputs_and_grads, qkv=(q, k, v), weight=weight)
        sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, attn_mask=dense)
        ref = run(sdpa, torch.float32)
        bf16 = run(sdpa, torch.bfloat16)
        flex = run(functools.partial(compiled, block_mask=bm), torch.bfloat16)
        for what, r, s, f in zip(("out", "dq", "dk", "dv"), ref, bf16, flex):
            err_flex, err_sdpa = (f - r).norm() / r.norm(), (s - r).norm() / r.norm()
            assert err_flex < 2 * err_sdpa + 1e-3 and err_flex < 2e-2, (name, what, float(err_flex), float(err_sdpa))
