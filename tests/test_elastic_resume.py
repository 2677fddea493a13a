"""Elastic exact resume on real processes: one pre-training run (epoch mode, 2 epochs) killed with
SIGKILL mid-epoch three times and resumed each time under another layout: 2 ranks -> 1 rank -> 2
ranks with 2 data workers each (1 -> 2 ranks and 1 -> 2 workers at once) -> 3 ranks, with
data.batch_size chosen so that every step trains 6 samples (ranks x batch per rank). Each change
alone is tested at the loader level in test_elastic_stream.py. The consumed-sample logs (trainer.log_samples) are
the witness: each epoch trains every sample at most once, and only the drop-last remainder that the
last resumed plan declared is missing."""

import re
from collections import Counter

import pytest
import torch

from aimv2.engine.checkpointing import checkpoint_step, newest_intact
from aimv2.engine.logs import read_metric
from aimv2.engine.stream_resume import read_sample_log
from test_exact_resume import command, shard_urls, train, train_and_kill

COUNTS = (12, 11, 10, 9, 9, 8, 8, 7, 7, 6, 5, 4)  # 96 samples in 12 uneven shards: 16 steps of 6 per epoch
# (ranks, data workers, batch per rank, kill once this many steps are logged; None: run to the end)
SEGMENTS = [(2, 1, 3, 3), (1, 1, 6, 6), (2, 2, 3, 10), (3, 2, 2, None)]


def layout(ranks: int, workers: int, batch: int) -> tuple[str, ...]:
    return (
        f"trainer.devices={ranks}",
        "trainer.strategy=ddp",
        f"data.num_workers={workers}",
        f"data.batch_size={batch}",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.keep_checkpoints=3",
    )


@pytest.mark.slow
def test_killed_runs_resumed_on_1_2_and_3_ranks_and_2_workers_see_each_sample_once_per_epoch(tmp_path):
    urls = shard_urls(tmp_path / "shards", COUNTS)
    run = tmp_path / "run"
    said = []
    for i, (ranks, workers, batch, kill_after) in enumerate(SEGMENTS):
        resume = ("trainer.resume=auto",) if i else ()
        cmd = command(run, urls, *layout(ranks, workers, batch), *resume)
        if kill_after is None:
            said.append(train(cmd, tmp_path, stderr=True))
        else:
            said.append(train_and_kill(cmd, tmp_path, run / "logs/samples/rank0.tsv", after_step=kill_after))
            assert checkpoint_step(newest_intact(run / "checkpoints")) >= kill_after - 2
    text = "\n".join(said)
    assert text.count("resuming epoch 0 under another data layout") >= 2, text[-3000:]  # mid-epoch 0 (16 steps)

    logs = {r: read_sample_log(run / f"logs/samples/rank{r}.tsv") for r in range(3)}
    steps = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    per_step = Counter()
    for rows in logs.values():
        rank_steps = [step for _, _, step, _ in rows]
        assert len(rank_steps) == len(set(rank_steps)), "a rank logged a step twice: a line past a checkpoint survived"
        for _, _, step, keys in rows:
            per_step[step] += len(keys)
    assert sorted(per_step) == list(range(1, steps + 1)) and set(per_step.values()) == {6}

    epochs: dict[int, Counter] = {}
    for rows in logs.values():
        for epoch, _, _, keys in rows:
            epochs.setdefault(epoch, Counter()).update(keys)
    assert sorted(epochs) == [0, 1]
    for epoch, seen in epochs.items():
        assert max(seen.values()) == 1, f"epoch {epoch}: a sample was trained on twice"
    declared = [int(n) for n in re.findall(r"resuming epoch 0 .*?\((\d+) samples left over", text)]
    assert sum(COUNTS) - len(epochs[0]) == declared[-1]  # nothing lost but the last plan's remainder
    assert read_metric(run / "logs/metrics.csv", "data/repeated_samples")[-1][1] == 0
    logged = [s for s, _ in read_metric(run / "logs/metrics.csv", "train/loss")]
    assert logged == sorted(set(logged)) and logged[-1] == steps - 1
