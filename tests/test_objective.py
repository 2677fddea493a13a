"""The AIMv2 losses against values computed by hand."""

import math

import pytest
import torch

import aimv2.objective as objective
from aimv2.objective import (
    LossSums,
    aimv2_loss,
    aimv2_loss_sums,
    global_losses,
    global_mean,
    image_loss,
    image_loss_sum,
    normalize_patches,
    patchify,
    text_loss,
    text_loss_sum,
)


def test_patchify_order_matches_grid_and_pixel_layout():
    # 1 image, 2 channels, 4x4 pixels, patch 2 -> 4 patches of 2*2*2 values.
    img = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(img, 2)
    assert patches.shape == (1, 4, 8)
    # Patch 1 is the top-right block; values ordered (row, col, channel).
    # channel 0 rows 0-1, cols 2-3: 2,3,6,7; channel 1 adds 16.
    assert patches[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]


def test_normalize_patches_by_hand():
    out = normalize_patches(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64), eps=0.0)
    # mean 2.5; unbiased variance (MAE, ml-l3m): ((1.5^2 + 0.5^2) * 2) / (4 - 1) = 5/3
    expected = [(v - 2.5) / math.sqrt(5 / 3) for v in (1, 2, 3, 4)]
    assert out[0, 0].tolist() == pytest.approx(expected, rel=1e-12)
    # eps sits inside the square root, as in MAE: (x - mean) / (var + 1e-6) ** 0.5
    flat = normalize_patches(torch.tensor([[[2.0, 2.0, 2.0, 5.0]]], dtype=torch.float64))
    # mean 2.75, unbiased variance (3 * 0.75^2 + 2.25^2) / 3 = 2.25
    assert flat[0, 0, 3].item() == pytest.approx(2.25 / math.sqrt(2.25 + 1e-6), rel=1e-12)


def test_image_loss_counts_only_non_prefix_targets():
    # N = 4 patches, P = 2 values. Position i predicts patch i+1.
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    pred = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 3.0], [9.0, 9.0]]])
    # Prefix M = 2: targets are patches 2 and 3, predicted at positions 1 and 2.
    # position 1 vs patch 2: ((2-2)^2 + (2-2)^2)/2 = 0 ; position 2 vs patch 3: ((0-3)^2+(3-3)^2)/2 = 4.5
    assert image_loss(pred, target, torch.tensor([2])).item() == pytest.approx((0 + 4.5) / 2)
    # Prefix M = 3: only patch 3 -> 4.5. The last position (9, 9) never counts.
    assert image_loss(pred, target, torch.tensor([3])).item() == pytest.approx(4.5)
    # Prefix M = 1: patches 1..3: position 0 vs patch 1: ((1-1)^2+(3-1)^2)/2 = 2 -> (2 + 0 + 4.5)/3
    assert image_loss(pred, target, torch.tensor([1])).item() == pytest.approx(6.5 / 3)


def test_image_loss_averages_over_all_counted_patches_of_the_batch():
    target = torch.zeros(2, 3, 1)
    pred = torch.tensor([[[1.0], [2.0], [0.0]], [[3.0], [0.0], [0.0]]])
    # sample 0 (M=1): positions 0,1 -> 1, 4 ; sample 1 (M=2): position 1 -> 0. Mean over 3 targets.
    assert image_loss(pred, target, torch.tensor([1, 2])).item() == pytest.approx(5 / 3)


def test_text_loss_ignores_padding():
    vocab = 4
    logits = torch.zeros(1, 3, vocab)
    logits[0, 0, 2] = math.log(3.0)  # p(token 2) = 3 / (3 + 3) = 0.5 at position 0
    tokens = torch.tensor([[2, 1, 0]])
    mask = torch.tensor([[True, True, False]])
    # position 0: -log(0.5); position 1 (uniform logits): -log(1/4); position 2 ignored.
    expected = (-math.log(0.5) - math.log(0.25)) / 2
    assert text_loss(logits, tokens, mask).item() == pytest.approx(expected, abs=1e-6)
    logits[0, 2] = torch.tensor([100.0, -100.0, -100.0, -100.0])  # padded position: no effect
    assert text_loss(logits, tokens, mask).item() == pytest.approx(expected, abs=1e-6)


def test_total_loss_weights_alpha_and_text_weight():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 28, 28)  # 4 patches of 14x14x3
    pixels, logits = torch.randn(2, 4, 588), torch.randn(2, 5, 10)
    tokens, mask = torch.randint(0, 10, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    prefix = torch.tensor([1, 2])
    full = aimv2_loss(pixels, logits, images, tokens, mask, prefix, 14, alpha=0.4)
    assert full.total.item() == pytest.approx(full.text.item() + 0.4 * full.image.item(), rel=1e-6)
    caption_only = aimv2_loss(pixels, logits, images, tokens, mask, prefix, 14, alpha=0.0)
    assert caption_only.total.item() == pytest.approx(full.text.item(), rel=1e-6)
    image_only = aimv2_loss(pixels, logits, images, tokens, mask, prefix, 14, alpha=1.0, text_weight=0.0)
    assert image_only.total.item() == pytest.approx(full.image.item(), rel=1e-6)
    # The image target is the per-patch normalized image.
    target = normalize_patches(patchify(images, 14))
    assert full.image.item() == pytest.approx(image_loss(pixels, target, prefix).item(), rel=1e-6)


def test_packed_logits_give_the_same_text_loss():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert text_loss(logits[mask], tokens, mask).item() == pytest.approx(
        text_loss(logits, tokens, mask).item(), rel=1e-6
    )
    index = torch.tensor([0, 1, 2, 5, 6, 7, 8, 9])  # the True positions of mask, flattened
    assert torch.equal(text_loss(logits[mask], tokens, mask, index), text_loss(logits[mask], tokens, mask))


def test_collator_gives_the_flat_positions_of_real_tokens():
    from aimv2.data.samples import ImageCaptionCollator

    class Lengths:  # a tokenizer whose captions are as long as their text says
        def __call__(self, captions):
            lengths = torch.tensor([int(c) for c in captions])
            mask = torch.arange(4)[None, :] < lengths[:, None]
            return torch.where(mask, 7, 0), mask

    batch = ImageCaptionCollator(Lengths())([(torch.zeros(3, 2, 2), "2"), (torch.zeros(3, 2, 2), "3")])
    assert batch["token_index"].tolist() == [0, 1, 4, 5, 6]


def test_the_means_are_sums_over_counts():
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    pred = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 3.0], [9.0, 9.0]]])
    # Prefix M = 2: patch 2 (error 0) and patch 3 (error 4.5), as in the test above.
    total, count = image_loss_sum(pred, target, torch.tensor([2]))
    assert (total.item(), count.item()) == (4.5, 2.0)
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy(logits[mask], tokens[mask], reduction="sum")
    for given in (logits, logits[mask]):  # (B, L, V) or the decoder's packed (n, V)
        total, count = text_loss_sum(given, tokens, mask)
        assert total.item() == pytest.approx(ce.item(), rel=1e-6) and count.item() == 8
    # The mean is bitwise the cross-entropy's own mean (one process trains on exactly the loss it always had).
    assert torch.equal(text_loss(logits, tokens, mask), torch.nn.functional.cross_entropy(logits[mask], tokens[mask]))


def test_a_term_without_targets_is_zero_not_nan():
    logits, tokens = torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long)
    nothing = torch.zeros(1, 3, dtype=torch.bool)
    assert text_loss(logits, tokens, nothing).item() == 0.0
    assert text_loss(logits[nothing], tokens, nothing).item() == 0.0


def test_the_fixed_size_loss_is_its_sums_means():
    torch.manual_seed(0)
    images, pixels, logits = torch.randn(2, 3, 28, 28), torch.randn(2, 4, 588), torch.randn(2, 5, 10)
    tokens, mask = torch.randint(0, 10, (2, 5)), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    prefix = torch.tensor([1, 3])
    sums = aimv2_loss_sums(pixels, logits, images, tokens, mask, prefix, 14)
    assert (sums.image_count.item(), sums.text_count.item()) == (3 + 1, 2 + 5)
    losses = aimv2_loss(pixels, logits, images, tokens, mask, prefix, 14, alpha=0.3, text_weight=0.7)
    assert torch.equal(losses.image, sums.image / sums.image_count)
    assert torch.equal(losses.text, sums.text / sums.text_count)
    assert torch.equal(losses.total, 0.7 * losses.text + 0.3 * losses.image)


def sums_of(image: float, image_count: float, text: float, text_count: float) -> LossSums:
    return LossSums(
        *(torch.tensor(v, requires_grad=i % 2 == 0) for i, v in enumerate((image, image_count, text, text_count)))
    )


def test_one_process_needs_no_collective(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no collective on one process")

    monkeypatch.setattr(torch.distributed, "all_reduce", refuse)
    sums = sums_of(6.0, 3.0, 10.0, 4.0)
    loss, logged = global_losses(sums, 0.4, 1.0, world_size=1)
    assert torch.equal(loss, sums.means(0.4, 1.0).total) and not logged.total.requires_grad
    assert loss.item() == pytest.approx(10 / 4 + 0.4 * 6 / 3)
    ce, n = torch.tensor(9.0, requires_grad=True), torch.tensor(3)
    loss, logged = global_mean(ce, n, world_size=1)
    assert loss.item() == logged.item() == 3.0 and loss.requires_grad


def test_a_rank_divides_its_sums_by_the_global_counts(monkeypatch):
    # Rank 0 holds 6 / 3 image and 10 / 4 text (sum / count); the other rank 2 / 1 and 0 / 0 (no tokens).
    other = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    monkeypatch.setattr(
        objective,
        "summed_over_ranks",
        lambda *values: tuple(torch.stack([v.double() for v in values]) + other[: len(values)]),
    )
    sums = sums_of(6.0, 3.0, 10.0, 4.0)
    loss, logged = global_losses(sums, 0.4, 1.0, world_size=2)
    # world_size * (S_text / C_text + 0.4 * S_img / C_img) with C over both ranks: 4 tokens, 4 patches
    assert loss.item() == pytest.approx(2 * (10 / 4 + 0.4 * 6 / 4))
    assert loss.dtype == torch.float32 and loss.requires_grad
    assert (logged.image.item(), logged.text.item()) == (pytest.approx(8 / 4), pytest.approx(10 / 4))
    assert logged.total.item() == pytest.approx(10 / 4 + 0.4 * 8 / 4) and logged.total.dtype == torch.float32
    # No tokens on any rank: the global count is clamped at 1, the term is 0 (no NaN in the gradient).
    loss, logged = global_losses(sums_of(6.0, 3.0, 0.0, 0.0), 0.4, 1.0, world_size=2)
    assert loss.item() == pytest.approx(2 * 0.4 * 6 / 4) and logged.text.item() == 0.0
    loss, logged = global_mean(torch.tensor(6.0), torch.tensor(3), world_size=2)  # the other: 2 over 1
    assert (loss.item(), logged.item()) == (pytest.approx(2 * 6 / 4), pytest.approx(8 / 4))
