"""metrics.csv after a kill that lands between a checkpoint and its step's row: Lightning saves a
step's checkpoint before it logs the step, so without help the resumed run would lack that row. The
checkpoint carries its step's row and the resume puts it back: one row per step, no gap."""

import csv
import inspect

import lightning
import pytest
from lightning.fabric.loggers.csv_logs import CSVLogger as FabricCSVLogger
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from aimv2.engine.logs import ResumableCSVLogger, _AppendingWriter, read_metric
from test_exact_resume import command, shard_urls, train


@pytest.mark.slow
def test_a_row_lost_after_its_checkpoint_is_restored_on_resume(tmp_path):
    urls = shard_urls(tmp_path / "shards", (12, 12))
    run = tmp_path / "run"
    short = ("data.num_workers=0", "trainer.checkpoint_every_n_steps=2", "trainer.max_epochs=-1")
    train(command(run, urls, *short, "trainer.max_steps=4"), tmp_path)
    metrics = run / "logs/metrics.csv"
    before = dict(read_metric(metrics, "train/loss"))
    assert sorted(before) == [0, 1, 2, 3]
    with open(metrics, newline="") as f:  # the kill: step 4's checkpoint is on disk, its row (step 3) is not
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if int(r["step"]) != 3]
    with open(metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    train(command(run, urls, *short, "trainer.max_steps=6", "trainer.resume=auto"), tmp_path)
    after = read_metric(metrics, "train/loss")
    assert [s for s, _ in after] == list(range(6))
    assert dict(after)[3] == before[3]  # the row the checkpoint carried, with the step's own value
    assert [e for _, e in read_metric(metrics, "epoch")][:4] == [0, 0, 0, 0]


@pytest.mark.slow
def test_rows_are_labelled_by_the_optimizer_step_when_lightnings_logging_counter_lags(tmp_path):
    """Lightning labels a row with its own `_batches_that_stepped`, which some resumes leave one behind
    `global_step` (benchmarks/chaos.py found runs whose metrics.csv repeated a step's row and lacked the
    last one). The modules log `step` themselves, so the label is the optimizer step whatever it says."""
    import torch

    urls = shard_urls(tmp_path / "shards", (12, 12))
    run = tmp_path / "run"
    short = ("data.num_workers=0", "trainer.checkpoint_every_n_steps=2", "trainer.max_epochs=-1")
    train(command(run, urls, *short, "trainer.max_steps=4"), tmp_path)
    last = run / "checkpoints/last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    loop = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
    # Saved at a step's end, before Lightning counts the step (its restore adds the 1 back).
    assert (checkpoint["global_step"], loop["_batches_that_stepped"]) == (4, 3)
    loop["_batches_that_stepped"] = 2  # one behind that: the lag
    torch.save(checkpoint, last)

    train(command(run, urls, *short, "trainer.max_steps=6", "trainer.resume=auto"), tmp_path)
    assert [s for s, _ in read_metric(run / "logs/metrics.csv", "train/loss")] == list(range(6))


UPGRADE = (
    f"lightning {lightning.__version__}: aimv2.engine.logs keeps metrics.csv across resumes through Lightning's "
    "private CSV writer hooks (no public switch in 2.6.6); find the new route there"
)


def test_the_private_lightning_hooks_the_appending_writer_relies_on_are_still_there(tmp_path):
    """_AppendingWriter overrides `_ExperimentWriter._check_log_dir_exists(self)` and ResumableCSVLogger
    caches its writer in `_experiment` (which CSVLogger.finalize reads): an upgrade that renames either
    fails here with a message, not as a resumed run whose metrics.csv silently lost its earlier rows."""
    hook = getattr(_ExperimentWriter, "_check_log_dir_exists", None)
    assert hook is not None and list(inspect.signature(hook).parameters) == ["self"], UPGRADE
    assert "self._check_log_dir_exists()" in inspect.getsource(_ExperimentWriter.__init__), UPGRADE
    assert "self._experiment is None" in inspect.getsource(FabricCSVLogger.finalize), UPGRADE

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n")
    with pytest.warns(UserWarning, match="will be deleted"):
        ExperimentWriter(str(log_dir))  # Lightning's own writer still deletes it: the override is still needed
    assert not (log_dir / "metrics.csv").exists(), f"{UPGRADE} (it no longer deletes metrics.csv: drop the override?)"
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n")
    logger = ResumableCSVLogger(str(tmp_path), name="", version="logs")
    writer = logger.experiment
    assert isinstance(writer, _AppendingWriter) and logger._experiment is writer
    assert writer.metrics_keys == ["epoch", "step", "train/loss"]
    logger.log_metrics({"train/loss": 1.25, "epoch": 0}, step=1)
    logger.finalize("success")
    assert read_metric(log_dir / "metrics.csv", "train/loss") == [(0, 1.5), (1, 1.25)]
