"""`aimv2 ablation` plumbing on a tiny scale (2 pre-training steps, one seed, one epoch of one head per
kind): every variant is trained or taken at step 0, every task probed (heads chosen on a held-out part of
train), every run's training and held-out validation losses kept, and the table, JSON and plot are
written. What the numbers say at a useful scale is in eval/results/ablation.md, not tested here."""

from __future__ import annotations

import json

import pytest
import torch

from aimv2 import cli
from aimv2.ablation.plan import VARIANTS
from aimv2.ablation.run import run_losses
from aimv2.checkpoints import load_encoder
from aimv2.config import load_config
from aimv2.engine.run_dir import RunDir
from conftest import REPO

PRETRAIN = [
    "trainer.max_steps=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
]
FLAGS = [
    "--probe",
    "optim.epochs=1",
    "--probe",
    "optim.warmup_epochs=0",
    "--probe",
    "optim.lrs=[1e-3]",
    "--probe",
    "optim.weight_decays=[0.05]",
    "--probe",
    "data.num_workers=0",
    "--probe",
    "progress_bar=false",
    "--probe",
    "accelerator=cpu",
    "--seeds",
    "0",
    "--scenes",
    "24",
    "16",
    "16",
]
TASKS = ["digit", "shape", "colour", "position", "size", "count"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    assert cli.main(["ablation", *PRETRAIN, "--out", str(out), *FLAGS]) == 0
    return out


@pytest.mark.slow
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
            assert set(cells) == {*TASKS, "mean over tasks", "mean over tasks, chosen on val"}
            assert cells["mean over tasks, chosen on val"]["mean"] >= cells["mean over tasks"]["mean"]
            assert cells["mean over tasks"]["per_seed"]["0"] == cells["mean over tasks"]["mean"]  # one seed
            for cell in cells.values():
                assert {"mean", "std", "min", "max", "n"} <= set(cell) and cell["n"] == 1 and 0 <= cell["mean"] <= 100
    assert len(summary["runs"]) == len(VARIANTS) * len(TASKS)
    table = (ablation / "ablation.md").read_text()
    assert "## attentive probe" in table and "| captioning |" in table and "position (unnamed)" in table
    assert (ablation / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # heads chosen on a held-out fifth of each task's train split, scored on val
    assert summary["selected_on"] == "select" and summary["probe_defaults"] == ["data.select_fraction=0.2"]
    assert all(r["selected_on"] == "select" and "select_top1" in r["best"]["linear"] for r in summary["runs"])
    probed = json.loads((ablation / "runs/pixel/seed0/probe/count/results.json").read_text())
    assert probed["select_count"] == 4 and probed["train_count"] == 12  # 16 scenes: a fifth of each class held out
    assert "chosen by its top-1 on the selection split" in table and "## choosing heads on val instead" in table
    for r in summary["runs"]:  # the best head on val is at least as good on val as the one chosen on select
        assert all(b["val_chosen_top1"] >= b["top1"] for b in r["best"].values())


@pytest.mark.slow
def test_keeps_training_and_validation_losses(ablation):
    summary = json.loads((ablation / "ablation.json").read_text())
    runs = {r["variant"]: r for r in summary["pretrain_runs"]}
    assert set(runs) == {"aimv2", "captioning", "pixel"}
    for run in runs.values():
        assert run["train_steps"] == [2, 2] and run["val_step"] == 2  # the last 10% of 2 logged steps; the last step
        assert set(run["train"]) == set(run["val"]) == {"total", "image", "caption"}
        assert 1.0 < run["val"]["caption"] < 8.0  # about ln(vocabulary) after 2 steps
    # captioning: a bidirectional encoder, so no image targets (0, marked untrained); pixel: caption untrained
    assert runs["captioning"]["val"]["image"] == 0.0 and runs["captioning"]["train"]["image"] == 0.0
    assert runs["aimv2"]["val"]["image"] > 0.1 and runs["pixel"]["val"]["image"] > 0.1
    losses = summary["losses"]
    assert [losses["captioning"]["val"][t]["trained"] for t in ("image", "caption")] == [False, True]
    assert [losses["pixel"]["train"][t]["trained"] for t in ("image", "caption")] == [True, False]
    assert losses["aimv2"]["val"]["caption"]["mean"] == runs["aimv2"]["val"]["caption"]
    assert "prefix_attention: false" in (ablation / "runs/captioning/seed0/config.yaml").read_text()
    assert "prefix_attention: true" in (ablation / "runs/aimv2/seed0/config.yaml").read_text()
    table = (ablation / "ablation.md").read_text()
    assert "## pre-training losses" in table and "| captioning | – |" in table


def test_captioning_only_trains_its_encoder_bidirectionally():
    """objective.prefix_attention=false for captioning only (no image loss: its encoder is trained as it is
    probed, as CapPa's); the variants with the image loss keep AIMv2's prefix-causal encoder."""
    for variant, overrides in VARIANTS.items():
        if overrides is None:
            continue
        cfg = load_config(REPO / "configs/pretrain/ablation.yaml", overrides)
        assert cfg.objective.prefix_attention is (variant != "captioning"), variant


def test_run_losses_by_hand(tmp_path):
    """Train: the mean of the last 10% of logged rows per term; val: every evaluation, the last as final
    (the csv's 0-based step column K-1 is optimizer step K)."""
    run = RunDir(tmp_path)
    run.logs.mkdir(parents=True)
    rows = ["step,train/loss,train/loss_img,train/loss_text,val/loss,val/loss_img,val/loss_text"]
    rows += [f"{s},{10 - s / 10},{1 + s},{2 + s},,," for s in range(9, 200, 10)]  # 20 logged steps
    rows += ["99,,,,3.0,0.5,2.8", "199,,,,2.0,0.25,1.9"]
    run.metrics.write_text("\n".join(rows) + "\n")
    got = run_losses(run)
    assert got["train_steps"] == [190, 200]  # the last 2 of 20 rows
    assert got["train"] == {"total": pytest.approx((10 - 18.9 + 10 - 19.9) / 2), "image": 195.0, "caption": 196.0}
    assert got["val_step"] == 200 and got["val"] == {"total": 2.0, "image": 0.25, "caption": 1.9}
    assert [e["step"] for e in got["val_curve"]] == [100, 200] and got["val_curve"][0]["image"] == 0.5
    assert run_losses(RunDir(tmp_path / "none")) == {}  # a run without metrics (never trained)


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert (
        cli.main(
            ["ablation", *PRETRAIN, "--out", str(ablation), *FLAGS, "--variants", "aimv2", "--probe", "optim.epochs=2"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("pre-training already done") == 1 and err.count("probing") == len(TASKS)
    summary = json.loads((ablation / "ablation.json").read_text())
    assert list(summary["variants"]) == ["aimv2"] and "optim.epochs=2" in summary["probe_overrides"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "random"], "step-0 checkpoint of a trained variant"),
        (["--variants", "aimv2", "mae"], "unknown variant(s) mae"),
        (["--task", "digits=/only/train"], "expected NAME=TRAIN,VAL"),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    assert cli.main(["ablation", "--out", str(tmp_path / "a"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before writing anything
