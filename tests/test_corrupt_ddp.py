"""Corrupt samples on several real DDP ranks (CPU, gloo), epoch mode, 3 epochs: the run ends (a rank
whose slots meet corrupt samples must not plan fewer steps than the others: DDP would hang), every
rank runs every step of every epoch, and the sample logs (trainer.log_samples) show each usable sample
trained in every epoch, the unplanned remainder aside, and no repeat that data/repeated_samples does not
count (a slot whose range ends in corrupt samples with batches still due repeats one sample per such
batch: with 8 of a 15-sample range corrupt that happens here; at scale only a corrupt tail does it).
Each run has a deadline (a hang fails with every process's stacks).

The data: three shards of 20; one holds 8 corrupt samples (truncated JPEG bytes). In each epoch the
shards are laid end to end in a new seeded order and cut into one range per slot, so the corrupt shard
reaches some slots only: one rank only, in at least one epoch (checked against the real plan)."""

import pytest

from aimv2.data.shardlist import resolve_shards
from aimv2.data.stream import ShardStream, StreamSource
from aimv2.engine.logs import read_metric
from aimv2.engine.stream_resume import read_sample_log
from test_exact_resume import command, epochs_of, shard_urls, train

COUNTS = (20, 20, 20)
CORRUPT = {(2, j) for j in (1, 4, 5, 9, 12, 13, 17, 18)}  # shard 2: 8 of its 20 samples
EPOCHS = 3


def keys(shard: int, n: int) -> set[str]:
    return {f"p{shard}_{j:06d}" for j in range(n)}


def ranks_reached(urls: str, ranks: int, workers: int, batch: int) -> list[set[int]]:
    """Per epoch, the ranks whose slots' ranges hold shard 2 (the run's own plan, recomputed)."""
    stream = ShardStream(
        [StreamSource("source0", resolve_shards(urls, "s", need_counts=True))],
        process=None,
        collate=None,
        batch_size=batch,
        mode="epoch",
        world_size=ranks,
        num_workers=workers,
    )
    out = []
    for epoch in range(EPOCHS):
        plan = stream.plan_for(epoch, None)
        out.append(
            {
                slot // max(1, workers)
                for slot in range(ranks * max(1, workers))
                if any(shard == 2 for shard, _, _ in plan.slot_units(slot))
            }
        )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ranks,workers,batch", [(2, 2, 2), (3, 1, 3)])
def test_corrupt_samples_on_some_ranks_neither_hang_nor_repeat_and_every_epoch_is_whole(
    tmp_path, ranks, workers, batch
):
    urls = shard_urls(tmp_path / "shards", COUNTS, corrupt=CORRUPT)
    reached = ranks_reached(urls, ranks, workers, batch)
    assert any(len(r) == 1 for r in reached), f"the scenario needs an epoch where one rank meets them: {reached}"
    run = tmp_path / "run"
    train(
        command(
            run,
            urls,
            f"trainer.devices={ranks}",
            "trainer.strategy=ddp",
            f"data.num_workers={workers}",
            f"data.batch_size={batch}",
            f"trainer.max_epochs={EPOCHS}",
            "trainer.checkpoint_every_n_steps=100",
        ),
        tmp_path,
    )

    # 60 samples over ranks x workers slots: every slot the same number of batches, every epoch
    slots = ranks * max(1, workers)
    per_epoch = (60 // slots) // batch * max(1, workers)  # steps per epoch
    logs = [read_sample_log(run / f"logs/samples/rank{r}.tsv") for r in range(ranks)]
    for rows in logs:
        assert [step for _, _, step, _ in rows] == list(range(1, EPOCHS * per_epoch + 1)), "a rank missed a step"
    usable = keys(0, 20) | keys(1, 20) | (keys(2, 20) - {f"p2_{j:06d}" for _, j in CORRUPT})
    epochs = epochs_of(logs)
    assert sorted(epochs) == list(range(EPOCHS))
    repeats = 0
    for epoch, seen in epochs.items():
        repeats += sum(n - 1 for n in seen.values())
        assert set(seen) <= usable, f"epoch {epoch}: a corrupt sample was trained"
        # what is not trained is the drop-last remainder that corrupt samples did not use up: less than a
        # batch per slot
        assert len(usable) - len(seen) < slots * batch, f"epoch {epoch}: {len(usable) - len(seen)} samples untrained"
    metrics = run / "logs/metrics.csv"
    assert read_metric(metrics, "data/skipped_samples")[-1][1] == len(CORRUPT) * EPOCHS  # each, every epoch
    assert read_metric(metrics, "data/repeated_samples")[-1][1] == repeats  # every repeat counted, none silent


@pytest.mark.slow
def test_skipped_samples_continue_their_total_over_a_ddp_resume(tmp_path):
    """Per-rank counters are saved as their sum and restored on rank 0 only: after a 2-rank resume the
    logged data/skipped_samples continues from the true total (restored on every rank, it was 2x)."""
    urls = shard_urls(tmp_path / "shards", COUNTS, corrupt=CORRUPT)
    run = tmp_path / "run"
    common = [
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.checkpoint_every_n_steps=100",
    ]
    train(command(run, urls, *common, "trainer.max_epochs=1"), tmp_path)
    metrics = run / "logs/metrics.csv"
    assert read_metric(metrics, "data/skipped_samples")[-1][1] == len(CORRUPT)
    train(command(run, urls, *common, "trainer.max_epochs=2", "trainer.resume=auto"), tmp_path)
    assert read_metric(metrics, "data/skipped_samples")[-1][1] == 2 * len(CORRUPT)
