"""Native resolution, model side: one encoder for any grid (2-D sin-cos positions, as AIMv2's native
release) and packed rows whose every loss, and the gradient of the batch loss, equal those of each
image alone."""

import pytest
import torch

from aimv2.models import AIMv2, get_size
from aimv2.models.masks import packed_decoder_mask, packed_encoder_mask
from aimv2.models.native import build_native_encoder, encode_packed, grid_position_embedding, pack_layout, pack_patches
from aimv2.objective import aimv2_loss, packed_aimv2_loss, patchify

P = 14


def coords_of(gh: int, gw: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([rows, cols], -1).reshape(1, gh * gw, 2)


def test_the_position_embedding_is_the_native_releases():
    transformers = pytest.importorskip("transformers.models.aimv2.modeling_aimv2")
    ref = transformers.build_2d_sinusoidal_position_embedding(5, 9, 64)  # [sin_h|cos_h|sin_w|cos_w]
    ref = torch.cat([ref[:, 32:], ref[:, :32]], dim=-1)  # the release's width-first order (Aimv2VisionEmbeddings)
    assert torch.equal(grid_position_embedding(5, 9, 64).reshape(45, 64), ref)
    # Hand-computed: patch (row 1, column 2), the first frequency of each quarter is 1.
    table = grid_position_embedding(2, 3, 8)
    expected = torch.tensor(
        [
            torch.sin(torch.tensor(2.0)),
            torch.sin(torch.tensor(2e-2)),
            torch.cos(torch.tensor(2.0)),
            torch.cos(torch.tensor(2e-2)),
            torch.sin(torch.tensor(1.0)),
            torch.sin(torch.tensor(1e-2)),
            torch.cos(torch.tensor(1.0)),
            torch.cos(torch.tensor(1e-2)),
        ]
    )
    assert torch.allclose(table[1, 2], expected, atol=1e-7)


def test_a_native_encoder_takes_any_grid_and_a_packed_row_gives_the_same_features():
    torch.manual_seed(0)
    encoder = build_native_encoder(get_size("debug")).eval()
    assert encoder.pos_embed is None and "pos_embed" not in encoder.state_dict()
    image = torch.randn(1, 3, 70, 126)  # a 5 x 9 grid
    features = encoder.forward_features(image)
    assert features.shape == (1, 45, 64)
    packed = encode_packed(encoder, patchify(image, P), coords_of(5, 9), None)
    assert torch.allclose(packed, features, atol=1e-5)


def test_packed_masks_hand_computed():
    # One row of 8 tokens: image 0 (2 x 2, prefix M=2), image 1 (1 x 3, M=1), one padding token.
    layout = pack_layout([(2, 2), (1, 3)], [2, 1], [[0, 1]], row_tokens=8, text_len=3)
    assert layout["patch_image"].tolist() == [[0, 0, 0, 0, 1, 1, 1, -1]]
    assert layout["coords"][0, :7].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 0], [0, 1], [0, 2]]
    mask = packed_encoder_mask(layout["patch_image"], layout["patch_pos"], torch.tensor([2, 1]))[0, 0].int()
    assert mask.tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0],  # image 0, patch 0: sees its prefix {0, 1}
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # patch 2: prefix and itself
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],  # image 1 (M=1): causal, never image 0
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # padding: itself only
    ]
    # Decoder row: image 0's 4 patches + 2 caption slots, image 1's 3 patches + 1 slot = 10 tokens.
    assert layout["dec_image"].tolist() == [[0] * 6 + [1] * 4]
    pad = 1 * 8 + 2 * 3
    assert layout["dec_source"].tolist() == [[0, 1, 2, 3, 8, 9, 4, 5, 6, 11]] and pad not in layout["dec_source"]
    dec = packed_decoder_mask(layout["dec_image"])[0, 0].int()
    assert dec[5].tolist() == [1] * 6 + [0] * 4 and dec[9].tolist() == [0] * 6 + [1] * 4
    assert layout["pixel_pred"].tolist() == [0, 1, 2, 6, 7] and layout["pixel_target"].tolist() == [1, 2, 3, 5, 6]
    assert layout["text_pred"].tolist() == [4, 5, 9] and layout["text_target"].tolist() == [0, 1, 3]


def test_a_packed_batch_gives_each_images_losses_and_gradients():
    torch.manual_seed(0)
    vocab, text_len = 50, 6
    model = AIMv2(get_size("debug"), 224, vocab, max_text_len=text_len, native=True)
    grids = [(2, 3), (4, 2), (3, 3), (1, 5), (2, 2)]
    lengths = [6, 3, 1, 4, 2]
    images = [torch.randn(1, 3, gh * P, gw * P) for gh, gw in grids]
    tokens = torch.randint(3, vocab, (len(grids), text_len))
    token_mask = torch.arange(text_len)[None, :] < torch.tensor(lengths)[:, None]
    tokens = tokens.masked_fill(~token_mask, 0)
    prefix = torch.tensor([3, 1, 5, 2, 3])
    rows = [[0, 3], [1, 4], [2]]  # 11, 12 and 9 patches in rows of 12: padding in two rows

    # Each image alone, through the fixed-size path (a batch of one).
    alone, grads_img, grads_txt, counts = [], [], [], []
    for i, image in enumerate(images):
        model.zero_grad()
        pixels, logits = model(image, tokens[i : i + 1], prefix[i : i + 1], token_mask[i : i + 1])
        losses = aimv2_loss(pixels, logits, image, tokens[i : i + 1], token_mask[i : i + 1], prefix[i : i + 1], P)
        alone.append((losses.image.item(), losses.text.item()))
        grads_img.append(
            torch.autograd.grad(losses.image, list(model.parameters()), retain_graph=True, allow_unused=True)
        )
        grads_txt.append(torch.autograd.grad(losses.text, list(model.parameters()), allow_unused=True))
        counts.append((grids[i][0] * grids[i][1] - prefix[i].item(), lengths[i]))

    layout = pack_layout(grids, lengths, rows, row_tokens=12, text_len=text_len)
    patches = pack_patches([patchify(image, P)[0] for image in images], layout)
    pixels, logits = model.forward_packed(patches, tokens, layout, prefix)
    # Per image: the packed terms equal the lone run's.
    for i, (l_img, l_txt) in enumerate(alone):
        only = layout["pixel_image"] == i
        packed_i = packed_aimv2_loss(
            pixels[only],
            logits,
            patches,
            tokens,
            {
                **layout,
                "pixel_target": layout["pixel_target"][only],
                "pixel_image": layout["pixel_image"][only],
                "pixel_target_pos": layout["pixel_target_pos"][only],
            },
            prefix,
        )
        assert abs(packed_i.image.item() - l_img) < 1e-5, i
        mine = (layout["text_target"] // text_len) == i
        ce = torch.nn.functional.cross_entropy(logits[mine], tokens.flatten()[layout["text_target"][mine]])
        assert abs(ce.item() - l_txt) < 1e-5, i
    # The batch loss: means over all counted patches and real tokens, so its gradient is the
    # count-weighted sum of the lone gradients.
    losses = packed_aimv2_loss(pixels, logits, patches, tokens, layout, prefix)
    n_img, n_txt = sum(c for c, _ in counts), sum(t for _, t in counts)
    assert abs(losses.image.item() - sum(a[0] * c[0] for a, c in zip(alone, counts)) / n_img) < 1e-5
    assert abs(losses.text.item() - sum(a[1] * c[1] for a, c in zip(alone, counts)) / n_txt) < 1e-5
    model.zero_grad()
    losses.total.backward()
    for k, (name, param) in enumerate(model.named_parameters()):
        expected = torch.zeros_like(param)
        for i, (c_img, c_txt) in enumerate(counts):
            if grads_img[i][k] is not None:
                expected += 0.4 * c_img / n_img * grads_img[i][k]
            if grads_txt[i][k] is not None:
                expected += c_txt / n_txt * grads_txt[i][k]
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), name


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="exactly once"):
        pack_layout([(2, 2), (2, 2)], [1, 1], [[0]], row_tokens=8, text_len=2)
    with pytest.raises(ValueError, match="more than its 4 tokens"):
        pack_layout([(2, 2), (1, 2)], [1, 1], [[0, 1]], row_tokens=4, text_len=2)
    with pytest.raises(ValueError, match="at least 2 patches"):
        pack_layout([(1, 1)], [1], [[0]], row_tokens=4, text_len=2)


def test_flex_attention_block_masks_give_the_dense_masks_results():
    """FlexAttention trains on GPUs only; its CPU forward (torch's eager reference) checks the masks."""
    torch.manual_seed(0)
    model = AIMv2(get_size("debug"), 224, 40, max_text_len=5, native=True).eval()
    grids, lengths = [(2, 3), (3, 3), (1, 4)], [5, 2, 3]
    layout = pack_layout(grids, lengths, [[0, 2], [1]], row_tokens=10, text_len=5)
    patches = pack_patches([torch.randn(gh * gw, P * P * 3) for gh, gw in grids], layout)
    tokens = torch.randint(3, 40, (3, 5))
    prefix = torch.tensor([2, 4, 1])
    with torch.no_grad():
        dense = model.forward_packed(patches, tokens, layout, prefix, backend="sdpa")
        flex = model.forward_packed(patches, tokens, layout, prefix, backend="flex")
    for a, b in zip(dense, flex):
        assert torch.allclose(a, b, atol=1e-5)
