"""`aimv2 probe` chooses heads on a selection split apart from the scored one: `data.select` (a split of
its own) or `data.select_fraction` (a class-stratified part of train held out from head training). The
best head is the one with the highest top-1 there, reported with its top-1 on val; results.json keeps
both per head. Without one, heads are chosen on val as before (`selected_on: val`)."""

from __future__ import annotations

import json

import pytest
import torch

from aimv2.config import validate_config
from aimv2.errors import UserError
from aimv2.probe.config import ProbeOptimConfig
from aimv2.probe.run import hold_out, run_probe
from test_probe_helpers import COLOURS, small_config, write_colour_folders, write_tiny_checkpoint

# Each class folder of the "val" split holds another colour's images (red under green, green under blue,
# blue under red): a head that learned the colours scores 0 there, a head that learned nothing scores
# what its constant guess happens to hit. So the best head on val is the one that did NOT learn.
SHIFTED = dict(zip(COLOURS, list(COLOURS.values())[-1:] + list(COLOURS.values())[:-1]))
OPTIM = ProbeOptimConfig(lrs=[1e-7, 3e-2], weight_decays=[0.05], epochs=6, warmup_epochs=1)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    write_tiny_checkpoint(root / "ckpt" / "model.ckpt")
    write_colour_folders(root / "train", 20, seed=0)
    write_colour_folders(root / "select", 8, seed=1)
    write_colour_folders(root / "val", 8, seed=2, classes=SHIFTED)
    return root


def _probe(sets, tmp, **data):
    cfg = small_config(tmp, sets / "train", sets / "val", optim=OPTIM, checkpoint=str(sets / "ckpt/model.ckpt"))
    for key, value in data.items():
        setattr(cfg.data, key, value)
    validate_config(cfg)
    return run_probe(cfg)


def test_the_best_head_is_chosen_on_the_selection_split_and_scored_on_val(sets, tmp_path):
    results = _probe(sets, tmp_path, select=str(sets / "select"))
    assert results["selected_on"] == "select" and results["select_count"] == 24 and results["train_count"] == 60
    for kind in ("attentive", "linear"):
        rows = {r["lr"]: r for r in results["heads"] if r["head"] == kind}
        learned, idle = rows[3e-2], rows[1e-7]
        # the learned head reads the colours on select, and so fails every val image; the idle one does not
        assert learned["select_top1"] >= 90.0 and learned["top1"] <= 10.0
        assert idle["select_top1"] <= 60.0 and idle["top1"] > learned["top1"]
        best_on_val = max(rows.values(), key=lambda r: r["top1"])
        chosen = results["best_per_kind"][kind]
        assert best_on_val["lr"] == 1e-7 and chosen["lr"] == 3e-2  # the selection split decides
        assert chosen["top1"] == learned["top1"] and chosen["select_top1"] == learned["select_top1"]
    assert results["best"]["select_top1"] == max(r["select_top1"] for r in results["heads"])
    assert sum(r["best"] for r in results["heads"]) == 1 and results["best"]["best"]
    saved = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert all({"top1", "top5", "select_top1", "select_top5"} <= set(r) for r in saved["heads"])
    table = (tmp_path / "probe" / "results.md").read_text()
    assert "| select top-1 | top-1 |" in table and "best on select" in table


def test_without_a_selection_split_heads_are_chosen_on_val_as_before(sets, tmp_path):
    results = _probe(sets, tmp_path)
    assert results["selected_on"] == "val" and "select_top1" not in results["heads"][0]
    for kind in ("attentive", "linear"):
        assert results["best_per_kind"][kind]["lr"] == 1e-7  # the head that learned nothing wins on this val
    assert results["best"]["top1"] == max(r["top1"] for r in results["heads"])


def test_a_fraction_of_train_chooses_and_the_rest_trains(sets, tmp_path):
    results = _probe(sets, tmp_path, select_fraction=0.25)
    assert results["selected_on"] == "select"
    assert results["select_count"] == 15 and results["train_count"] == 45  # 5 + 15 of each class's 20
    for kind in ("attentive", "linear"):
        assert results["best_per_kind"][kind]["lr"] == 3e-2 and results["best_per_kind"][kind]["select_top1"] == 100.0


def test_hold_out_is_class_stratified_and_deterministic():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)[
        torch.randperm(18, generator=torch.Generator().manual_seed(3))
    ]
    kept, held = hold_out(labels, 0.2, seed=0)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(18))  # a partition of the rows
    assert torch.bincount(labels[held], minlength=4).tolist() == [2, 1, 0, 1]  # round(0.2 n), >= 1, <= n - 1
    again = hold_out(labels, 0.2, seed=0)
    assert torch.equal(again[1], held) and not torch.equal(hold_out(labels, 0.2, seed=1)[1], held)


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"data.select": "x", "data.select_fraction": 0.2}, "data.select_fraction"),
        ({"data.select_fraction": 1.0}, "data.select_fraction"),
        ({"data.select_fraction": 0.2, "mode": "augmented"}, "data.select"),
    ],
)
def test_selection_mistakes_are_one_line_errors(tmp_path, changes, key):
    from aimv2.config import load_config
    from aimv2.probe.config import ProbeConfig

    overrides = ["checkpoint=c", "data.train=t", "data.val=v", *(f"{k}={v}" for k, v in changes.items())]
    with pytest.raises(UserError, match=f"config key '{key}'"):
        load_config(None, overrides, schema=ProbeConfig)
