"""Probe heads and the grid: the batched attentive head equals the textbook one; a head learns a
linearly separable task; the grid trains distinct heads and picks the best on validation."""

import torch

from aimv2.probe.config import ProbeConfig, ProbeDataConfig, ProbeOptimConfig
from aimv2.probe.head_grid import HeadGrid, grid_specs
from aimv2.probe.heads import AttentiveHeads, reference_attentive
from aimv2.probe.run import evaluate_tensors, train_cached


def test_batched_attentive_heads_match_textbook_attention_pooling():
    torch.manual_seed(0)
    heads = AttentiveHeads(num_heads=3, dim=128, num_classes=5, attention_heads=2)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # make the probes differ
    heads.bn.running_mean.normal_()
    heads.bn.running_var.uniform_(0.5, 2.0)
    heads.eval()
    tokens = torch.randn(4, 9, 128)
    batched = heads(tokens)  # (B, H, C)
    for h in range(3):
        torch.testing.assert_close(batched[:, h], reference_attentive(tokens, heads, h), rtol=1e-4, atol=1e-5)


def test_attentive_probe_defaults_to_the_encoders_own_heads():
    """AIMv1/AIMv2 protocol: the pooling attention has the trunk's number of heads (not width // 64)."""
    import pytest

    from aimv2.errors import UserError
    from aimv2.models.encoder import build_encoder
    from aimv2.models.sizes import get_size
    from aimv2.probe.heads import encoder_attention_heads

    with torch.device("meta"):  # shapes only: the large trunk without its 1.2 GB of weights
        expected = {"debug": 2, "small": 6, "large": 8, "huge": 12, "3b": 24}
        found = {size: encoder_attention_heads(build_encoder(get_size(size), 56)) for size in expected}
    assert found == expected  # large: 8 heads of 128, where width // 64 gave 16 heads of 64
    heads = AttentiveHeads(num_heads=2, dim=64, num_classes=3, attention_heads=found["debug"])
    assert heads.A == 2 and heads(torch.randn(4, 5, 64)).shape == (4, 2, 3)
    with pytest.raises(UserError, match="head.attention_heads"):
        encoder_attention_heads(torch.nn.Linear(2, 2))


def _separable(n: int, seed: int):
    """Tokens (n, 4, 16) whose class (of 4) is the argmax of a fixed linear map of their mean, kept only
    with a margin (top-2 gap > 0.5): linearly separable with room to spare."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(123))
    tokens = torch.randn(3 * n, 4, 16, generator=g)
    scores = tokens.mean(1) @ w
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1] > 0.5).nonzero().squeeze(1)[:n]
    return tokens[keep], scores[keep].argmax(1)


def _train(kinds, lrs, wds, epochs=30):
    cfg = ProbeConfig(
        checkpoint="-",
        data=ProbeDataConfig(train="-", val="-", batch_size=64),
        optim=ProbeOptimConfig(lrs=lrs, weight_decays=wds, epochs=epochs, warmup_epochs=1),
        progress_bar=False,
    )
    cfg.head.kinds = kinds
    torch.manual_seed(0)
    grid = HeadGrid(grid_specs(kinds, lrs, wds), 16, 4, cfg.optim)
    x, y = _separable(1024, 0)
    train_cached(grid, {"features": x, "labels": y}, cfg, torch.device("cpu"), None, "", False)
    xv, yv = _separable(512, 1)
    return grid, grid.results(evaluate_tensors(grid, {"features": xv, "labels": yv}, 128, torch.device("cpu")))


def test_heads_learn_a_linearly_separable_task():
    _, rows = _train(["linear", "attentive"], [1e-2], [0.05])
    for row in rows:
        assert row["top1"] >= 98.0, row


def test_grid_trains_distinct_heads_and_best_is_chosen_on_val():
    lrs = [1e-5, 1e-4, 1e-2]
    grid, rows = _train(["linear"], lrs, [0.0, 0.1], epochs=10)
    w = grid.heads["linear"].weight.detach()  # (6, C, D), order lr-major, then wd
    for i in range(len(w)):
        for j in range(i + 1, len(w)):
            assert not torch.allclose(w[i], w[j]), (i, j)
    assert rows[0]["top1"] < rows[-1]["top1"]
    best = max(rows, key=lambda r: r["top1"])
    assert best["lr"] == 1e-2
