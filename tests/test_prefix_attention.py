"""`objective.prefix_attention`: false trains the encoder bidirectionally (no attention mask at all, as at
inference and as captioning baselines such as CapPa train it), with no image targets; it is refused with
alpha > 0. Values are checked against a bidirectional forward of the same weights, by hand. (The
ablation's captioning-only variant that sets it: tests/test_ablation.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aimv2.config import load_config
from aimv2.data.native import PackedCollator, place_rows
from aimv2.errors import UserError
from aimv2.pretraining.module import AIMv2PretrainModule
from conftest import REPO

P, SIZE, TEXT_LEN, VOCAB = 14, 56, 8, 40
LENGTHS = [2, 8, 5]  # real caption tokens per sample


def make_module(prefix_attention: bool, alpha: float = 0.0, native: bool = False) -> AIMv2PretrainModule:
    torch.manual_seed(0)
    return AIMv2PretrainModule(
        {"size": "debug", "img_size": SIZE, "native": native},
        {"alpha": alpha, "text_weight": 1.0, "prefix_attention": prefix_attention},
        {},
        vocab_size=VOCAB,
        max_text_len=TEXT_LEN,
    ).eval()


def captions():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, SIZE, SIZE, generator=g)
    mask = torch.arange(TEXT_LEN)[None, :] < torch.tensor(LENGTHS)[:, None]  # (3, L)
    tokens = torch.randint(3, VOCAB, (3, TEXT_LEN), generator=g).masked_fill(~mask, 0)
    return images, tokens, mask


def masks_seen(module: AIMv2PretrainModule) -> list:
    """Every attn_mask the encoder's forward_features is given from now on."""
    seen = []
    original = module.model.encoder.forward_features

    def spy(x, attn_mask=None, **kw):
        seen.append(attn_mask)
        return original(x, attn_mask=attn_mask, **kw)

    module.model.encoder.forward_features = spy
    return seen


def test_bidirectional_encoder_gets_no_mask_and_the_caption_loss_of_a_plain_forward():
    images, tokens, mask = captions()
    batch = {"image": images, "tokens": tokens, "token_mask": mask}
    bidirectional = make_module(prefix_attention=False)
    seen = masks_seen(bidirectional)
    with torch.no_grad():
        losses, n = bidirectional._losses(batch, torch.Generator().manual_seed(0))
        # given prefix lengths (the held-out validation passes its own) change nothing either
        again, _ = bidirectional._losses(batch, None, prefix=torch.tensor([1, 5, 15]))
        # by hand: the inference forward (no mask anywhere in the encoder), cross-entropy of the real tokens
        _, logits = bidirectional.model(images, tokens, None, mask)  # (15, V) at the real tokens
        by_hand = F.cross_entropy(logits, tokens[mask])
    assert seen[:2] == [None, None] and n == 3
    assert losses.image.item() == 0.0  # no image targets: M = N for every sample
    assert losses.text.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert losses.total.item() == pytest.approx(by_hand.item(), rel=1e-6)  # alpha 0, text weight 1
    assert again.text.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert 2.5 < by_hand.item() < 6.0  # about ln(40) = 3.7 at init: a real cross-entropy, not 0
    # The same weights with prefix attention: the encoder is given the (B, 1, N, N) prefix mask, whose
    # entries above the diagonal outside the prefix are -inf, and the caption loss differs.
    causal = make_module(prefix_attention=True)
    seen = masks_seen(causal)
    with torch.no_grad():
        prefixed, _ = causal._losses(batch, None, prefix=torch.tensor([1, 5, 15]))
    (bias,) = seen
    assert bias.shape == (3, 1, 16, 16)
    assert torch.isinf(bias[0, 0, 0, 1]) and bias[1, 0, 0, 4] == 0 and torch.isinf(bias[1, 0, 0, 5])
    # M = 15: only key 15 (outside the prefix) is hidden, from the 15 queries before it
    assert bool(torch.isinf(bias[2, 0, :15, 15]).all()) and int(torch.isinf(bias[2]).sum()) == 15
    assert abs(prefixed.text.item() - by_hand.item()) > 1e-4


def test_bidirectional_packed_rows_have_no_prefix_and_no_image_targets():
    grids = [(4, 4), (3, 5), (2, 3)]
    g = torch.Generator().manual_seed(2)
    native = [torch.randn(3, gh * P, gw * P, generator=g) for gh, gw in grids]
    _, tokens, mask = captions()
    collate = PackedCollator(lambda idx: (tokens[idx], mask[idx]), P, 24)
    batch = collate([(native[i], i) for i in range(3)], place_rows([gh * gw for gh, gw in grids], 24))
    module = make_module(prefix_attention=False, native=True)
    with torch.no_grad():
        sums, _ = module._packed_loss_sums(batch, torch.Generator().manual_seed(0))
        _, logits = module.model.forward_packed(batch["patches"], batch["tokens"], batch["layout"], None)
        by_hand = F.cross_entropy(logits, batch["tokens"].flatten()[batch["layout"]["text_target"]], reduction="sum")
    assert sums.image_count.item() == 0 and sums.image.item() == 0
    assert sums.text_count.item() == sum(LENGTHS)
    assert sums.text.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_false_with_an_image_loss_is_a_one_line_error():
    with pytest.raises(UserError) as err:
        load_config(REPO / "configs/pretrain/ablation.yaml", ["objective.prefix_attention=false"])
    message = str(err.value)
    assert "objective.prefix_attention" in message and "objective.alpha=0" in message and "\n" not in message
    cfg = load_config(
        REPO / "configs/pretrain/ablation.yaml", ["objective.prefix_attention=false", "objective.alpha=0"]
    )
    assert cfg.objective.prefix_attention is False
    assert load_config(REPO / "configs/pretrain/ablation.yaml").objective.prefix_attention is True  # the default
