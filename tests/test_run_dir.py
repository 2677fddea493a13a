"""The run directory object names every path of a run once; the jobs write it and the readers find
things through it."""

from pathlib import Path

from aimv2.engine.run_dir import RunDir, step_checkpoint_name


def test_every_path_of_a_run(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config == tmp_path / "r/config.yaml" and run.last_checkpoint == tmp_path / "r/checkpoints/last.ckpt"
    assert run.step_checkpoint(42) == tmp_path / "r/checkpoints/step=0000042.ckpt"
    assert step_checkpoint_name(0) == "step=0000000.ckpt"
    assert (run.metrics, run.tensorboard, run.samples) == (
        tmp_path / "r/logs/metrics.csv",
        tmp_path / "r/logs/tensorboard",
        tmp_path / "r/logs/samples",
    )
    assert (run.visualizations, run.probe, run.report, run.eval) == tuple(
        tmp_path / "r" / n for n in ("visualizations", "probe", "report", "eval")
    )
    assert RunDir(run.probe).results_json == tmp_path / "r/probe/results.json"
    assert run.held() == [] and RunDir(str(tmp_path / "r")) == run


def test_the_run_of_a_checkpoint(tmp_path):
    assert RunDir.of_checkpoint(tmp_path / "r/checkpoints/last.ckpt") == RunDir(tmp_path / "r")
    assert RunDir.of_checkpoint("runs/x/checkpoints/step=0000001.ckpt/") == RunDir("runs/x")  # a ZeRO directory
    assert RunDir.of_checkpoint(tmp_path / "exports/model.ckpt") is None
    assert RunDir.label_of("runs/x/checkpoints/last.ckpt") == "x" and RunDir.label_of("a.ckpt") == "a.ckpt"


def test_no_module_spells_run_paths_by_hand():
    """Paths inside a run are RunDir's: other modules do not join "checkpoints", "metrics.csv", ..."""
    package = Path(__file__).resolve().parents[1] / "aimv2"
    names = (
        '"checkpoints"',
        '"last.ckpt"',
        '"metrics.csv"',
        '"visualizations"',
        '"config.yaml"',
        '"logs"',
        '"results.json"',
        "parent.parent",
    )
    found = [
        f"{p.relative_to(package.parent)}:{i}"
        for p in sorted(package.rglob("*.py"))
        if p.name != "run_dir.py"
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if any(n in line for n in names) and not line.lstrip().startswith("#") and "not a run path" not in line
    ]
    assert not found, found
