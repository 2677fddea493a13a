"""`aimv2 report` on the CSV logs of two real short runs: curves PNG, run names, final losses,
config differences and probe results in the Markdown."""

import json
import statistics

import pytest
from PIL import Image

from aimv2 import cli
from aimv2.engine.logs import read_metric, tail_mean
from aimv2.viz.report import config_differences, load_runs, run_names, write_report
from viz_runs import STEPS, short_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return short_runs(tmp_path_factory)


@pytest.mark.slow
def test_report_names_runs_and_lists_final_losses_and_config_differences(runs, tmp_path):
    a, b = runs["a"], runs["b"]
    written = write_report([a, b], tmp_path / "rep")
    assert written["names"] == ["lr_a", "lr_b"]
    assert Image.open(written["curves"]).size == (960, 528)  # 12 x 6.6 inches at 80 dpi
    assert written["curves"].stat().st_size < 200_000
    md = written["markdown"].read_text()
    assert md.startswith("# aimv2 report: lr_a, lr_b") and "![training curves](curves.png)" in md
    for run in (a, b):
        row = next(line for line in md.splitlines() if line.startswith(f"| {run.name} |"))
        image = tail_mean([v for _, v in read_metric(run / "logs/metrics.csv", "train/loss_img")])
        text = tail_mean([v for _, v in read_metric(run / "logs/metrics.csv", "train/loss_text")])
        assert row.split(" | ")[2:5] == [str(STEPS), f"{image:.4g}", f"{text:.4g}"]
        waits = [v for _, v in read_metric(run / "logs/metrics.csv", "train/data_wait_s")]
        assert len(waits) == STEPS - 1 and all(w >= 0 for w in waits)  # logged from the second step on
        assert row.split(" | ")[6] == f"{statistics.median(waits):.3g}"
    # The config difference is the learning rate, and only it (run_dir is left out).
    assert "| optim.lr | 0.002 | 0.0005 |" in md
    diffs = dict(config_differences(load_runs([a, b])))
    assert diffs == {"optim.lr": [0.002, 0.0005]}


@pytest.mark.slow
def test_probe_results_appear_when_the_run_has_them(runs, tmp_path):
    run = runs["b"]
    best = {"head": "attentive", "lr": 0.001, "wd": 0.05, "top1": 87.5, "top5": 98.25, "best": True}
    (run / "probe").mkdir(exist_ok=True)
    (run / "probe" / "results.json").write_text(
        json.dumps(
            {
                "checkpoint": str(run / "checkpoints/last.ckpt"),
                "mode": "cached",
                "epochs": 3,
                "val_count": 40,
                "best": best,
                "heads": [best],
            }
        )
    )
    try:
        md = write_report([run], tmp_path / "one")["markdown"].read_text()
    finally:
        (run / "probe" / "results.json").unlink()
    assert "| lr_b | attentive | 0.001 | 0.05 | 87.50 | 98.25 | cached | 3 | 40 |" in md
    assert "## Key settings" in md and "| optim.lr | 0.0005 |" in md


@pytest.mark.slow
def test_cli_report_default_out_and_errors(runs, capsys):
    assert cli.main(["report", str(runs["a"])]) == 0
    out = capsys.readouterr().out
    assert str(runs["a"] / "report" / "curves.png") in out and str(runs["a"] / "report" / "report.md") in out
    missing = runs["root"] / "nope"
    assert cli.main(["report", str(runs["a"]), str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"aimv2 report: error: run directory not found: {missing}"
    assert cli.main(["report", str(runs["root"] / "shards")]) == 2
    assert "no logs/metrics.csv" in capsys.readouterr().err


def test_runs_with_the_same_directory_name_get_distinct_names(tmp_path):
    paths = [tmp_path / "x" / "pretrain", tmp_path / "y" / "pretrain", tmp_path / "solo"]
    assert run_names(paths) == ["x/pretrain", "y/pretrain", "solo"]
