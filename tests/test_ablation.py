"""`aimv2 ablation` plumbing on a tiny scale (2 pre-training steps, one seed, one epoch of one head per
kind): every variant is trained or taken at step 0, every task probed, and the table, JSON and plot
are written. What the numbers say at a useful scale is in eval/results/ablation.md, not tested here."""

from __future__ import annotations

import json

import pytest
import torch

from aimv2 import cli
from aimv2.ablation.plan import VARIANTS
from aimv2.checkpoints import load_encoder

PRETRAIN = ["trainer.max_steps=2", "data.batch_size=8", "data.num_workers=0", "trainer.progress_bar=false"]
FLAGS = ["--probe", "optim.epochs=1", "--probe", "optim.warmup_epochs=0", "--probe", "optim.lrs=[1e-3]",
        "--probe", "optim.weight_decays=[0.05]", "--probe", "data.num_workers=0", "--probe", "progress_bar=false",
        "--probe", "accelerator=cpu", "--seeds", "0", "--scenes", "24", "16", "16"]
TASKS = ["digit", "shape", "colour", "position", "size", "count"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    assert cli.main(["ablation", *PRETRAIN, "--out", str(out), *FLAGS]) == 0
    return out


def test_writes_table_json_and_plot(ablation):
    summary = json.loads((ablation / "ablation.json").read_text())
    assert summary["seeds"] == [0] and list(summary["variants"]) == list(VARIANTS)
    assert [t["name"] for t in summary["tasks"]] == TASKS
    assert [t["named"] for t in summary["tasks"]] == [True, True, True, False, False, False]
    assert summary["command"].startswith("aimv2 ablation ") and "--seeds 0" in summary["command"]
    assert {"cpu", "cores", "torch", "date"} <= set(summary["machine"])
    for kind in ("attentive", "linear"):
        for variant in VARIANTS:
            cells = summary["summary"][kind][variant]
            assert set(cells) == {*TASKS, "mean over tasks"}
            for cell in cells.values():
                assert {"mean", "std", "min", "max", "n"} <= set(cell) and cell["n"] == 1 and 0 <= cell["mean"] <= 100
    assert len(summary["runs"]) == len(VARIANTS) * len(TASKS)
    table = (ablation / "ablation.md").read_text()
    assert "## attentive probe" in table and "| captioning |" in table and "position (unnamed)" in table
    assert (ablation / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_share_their_initialization(ablation):
    """Random init is the step-0 checkpoint, the same weights every trained variant started from."""
    runs = ablation / "runs"
    first = load_encoder(runs / "aimv2" / "seed0" / "checkpoints" / "step=0000000.ckpt")[0].state_dict()
    for variant in ("captioning", "pixel"):
        other = load_encoder(runs / variant / "seed0" / "checkpoints" / "step=0000000.ckpt")[0].state_dict()
        assert all(torch.equal(first[k], other[k]) for k in first)
    trained = load_encoder(runs / "aimv2" / "seed0" / "checkpoints" / "last.ckpt")[0].state_dict()
    assert any(not torch.equal(first[k], trained[k]) for k in first)
    probed = json.loads((runs / "random" / "seed0" / "probe" / "digit" / "results.json").read_text())
    assert probed["checkpoint"].endswith("aimv2/seed0/checkpoints/step=0000000.ckpt")


def test_rerun_reuses_finished_work_and_refuses_other_settings(ablation, capsys):
    results = {p: p.stat().st_mtime_ns for p in (ablation / "runs").rglob("results.json")}
    capsys.readouterr()
    assert cli.main(["ablation", *PRETRAIN, "--out", str(ablation), *FLAGS]) == 0
    err = capsys.readouterr().err
    assert err.count("pre-training already done") == 3 and "probing" not in err
    assert {p: p.stat().st_mtime_ns for p in results} == results
    assert cli.main(["ablation", *PRETRAIN, "trainer.max_steps=3", "--out", str(ablation), *FLAGS]) == 2
    assert "other settings" in capsys.readouterr().err
    # Other probe settings re-probe the same checkpoints (here one variant) without pre-training again.
    assert cli.main(["ablation", *PRETRAIN, "--out", str(ablation), *FLAGS, "--variants", "aimv2",
                     "--probe", "optim.epochs=2"]) == 0
    err = capsys.readouterr().err
    assert err.count("pre-training already done") == 1 and err.count("probing") == len(TASKS)
    summary = json.loads((ablation / "ablation.json").read_text())
    assert list(summary["variants"]) == ["aimv2"] and "optim.epochs=2" in summary["probe_overrides"]


@pytest.mark.parametrize("argv, message", [
    (["--variants", "random"], "step-0 checkpoint of a trained variant"),
    (["--variants", "aimv2", "mae"], "unknown variant(s) mae"),
    (["--task", "digits=/only/train"], "expected NAME=TRAIN,VAL"),
])
def test_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    assert cli.main(["ablation", "--out", str(tmp_path / "a"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before writing anything
