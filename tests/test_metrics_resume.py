"""metrics.csv after a kill that lands between a checkpoint and its step's row: Lightning saves a
step's checkpoint before it logs the step, so without help the resumed run would lack that row. The
checkpoint carries its step's row and the resume puts it back: one row per step, no gap."""

import csv

import pytest

from aimv2.engine.logs import read_metric
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
