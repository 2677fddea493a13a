"""Elastic resume of the epoch-mode stream at the loader level: an epoch cut under one layout (ranks x
workers x batch per rank) continues under another and still sees every sample once, the new plan's
declared drop-last remainder aside. Ranks are simulated in one process (each rank's loader is what a
DDP rank runs; their saved states are merged the way the all-gather merges them); tests/
test_elastic_resume.py does the same with real DDP processes killed by SIGKILL."""

import logging
import re

import torch

from aimv2.data.epoch_plan import Consumed, slot_read_order
from aimv2.data.loader import EpochAwareLoader, saved_lanes
from aimv2.data.samples import decode_image
from aimv2.data.shardlist import resolve_shards
from aimv2.data.stream import ShardStream, StreamSource
from conftest import write_caption_shards

COUNTS = (13, 11, 9, 8, 7, 6, 5)  # 59 samples in 7 uneven shards


def key_of(sample):
    decode_image(sample)  # corrupt samples raise
    return sample["__key__"]


def collate(items):
    return {"keys": list(items)}


def sources(tmp_path, corrupt=()):
    """One source of 7 shards; `corrupt` holds (shard, index) pairs written as undecodable bytes."""
    out = []
    for i, n in enumerate(COUNTS):
        report = write_caption_shards(
            tmp_path / f"p{i}", n, 100, prefix=f"p{i}_", seed=i, corrupt_at={j for s, j in corrupt if s == i}
        )
        out.extend(resolve_shards(report.urls, "s", need_counts=True))
    return [StreamSource("s", out)]


class Ranks:
    """`world` loaders, one per simulated rank, each with the same layout."""

    def __init__(self, srcs, world, workers, batch, state=None):
        self.loaders = []
        for rank in range(world):
            stream = ShardStream(
                srcs,
                process=key_of,
                collate=collate,
                batch_size=batch,
                mode="epoch",
                rank=rank,
                world_size=world,
                num_workers=workers,
                shuffle_buffer=4,
                seed=5,
            )
            stream.segment = 6
            loader = EpochAwareLoader(stream, num_workers=workers)
            if state is not None:
                loader.load_position_state(state)
            self.loaders.append(loader)
        self.iters = [iter(loader) for loader in self.loaders]
        self.skipped = 0

    def steps(self, n=None) -> list[list[str]]:
        """Up to n steps, every rank one batch per step (as DDP runs); the keys trained per step."""
        trained = []
        while n is None or len(trained) < n:
            keys = []
            for loader, it in zip(self.loaders, self.iters):
                batch = next(it, None)
                if batch is None:
                    assert not keys, "ranks ran out of batches at different steps (DDP would hang)"
                    return trained
                loader.mark_consumed(batch["stream_pos"], batch["repeated"])
                keys += batch["keys"]
                self.skipped += int(batch["skipped"])
            trained.append(keys)
        return trained

    def state(self) -> dict:
        """What rank 0 saves: the all-gather of `position_state` answered with every rank's table."""
        tables = []
        for loader in self.loaders:
            loader._gather = lambda t: (tables.append(t), t[None])[1]
            loader.position_state()
        self.loaders[0]._gather = lambda t: torch.stack(tables)
        return self.loaders[0].position_state()


def remainder_declared(text: str) -> int:
    return int(re.findall(r"\((\d+) samples left over", text)[-1])


def valid_keys(corrupt=()) -> set[str]:
    return {f"p{i}_{j:06d}" for i, n in enumerate(COUNTS) for j in range(n) if (i, j) not in corrupt}


def test_an_epoch_continues_on_1_then_3_ranks_and_2_workers_seeing_each_sample_once(tmp_path, caplog):
    srcs, valid = sources(tmp_path), valid_keys()
    first = Ranks(srcs, world=2, workers=1, batch=3)
    trained = first.steps(3)
    with caplog.at_level(logging.WARNING):
        second = Ranks(srcs, world=1, workers=1, batch=6, state=first.state())  # 2 -> 1 rank, same 6 per step
        trained += second.steps(2)
        third = Ranks(srcs, world=3, workers=2, batch=2, state=second.state())  # 1 -> 3 ranks, 1 -> 2 workers
        trained += third.steps()
    seen = [k for step in trained for k in step]
    assert len(seen) == len(set(seen)), "a sample was trained on twice in the epoch"
    assert len(valid) - len(seen) == remainder_declared(caplog.text) < 3 * 2 * 2  # the declared remainder only
    assert set(seen) <= valid and all(len(step) == 6 for step in trained)  # 6 samples per step throughout
    assert "samples per step change" not in caplog.text
    assert [loader.repeated for loader in third.loaders] == [0, 0, 0]
    # The next epoch under the new layout is a whole, fresh one.
    third.iters = [iter(loader) for loader in third.loaders]
    nxt = [k for step in third.steps() for k in step]
    stream = third.loaders[0].dataset  # a whole epoch's plan: its own remainder (59 samples, 6 slots)
    assert len(nxt) == len(set(nxt)) == stream.full_batches * 6 * 2


def test_corrupt_samples_across_a_layout_change_are_counted_once_and_nothing_repeats(tmp_path, caplog):
    corrupt = {(1, 4), (5, 0)}
    srcs, valid = sources(tmp_path, corrupt), valid_keys(corrupt)
    first = Ranks(srcs, world=2, workers=1, batch=3)
    trained, skipped = first.steps(3), first.skipped
    with caplog.at_level(logging.WARNING):
        second = Ranks(srcs, world=3, workers=2, batch=2, state=first.state())
    trained += second.steps()
    skipped += second.skipped
    seen = [k for step in trained for k in step]
    # A slot that meets a corrupt sample uses up its share of the drop-last remainder first, then trains a
    # lighter batch: no sample twice, and every usable one but the declared remainder trained.
    assert len(seen) == len(set(seen)) and set(seen) <= valid
    assert len(valid) - len(seen) <= remainder_declared(caplog.text)
    assert sum(loader.repeated for loader in second.loaders) == 0
    assert skipped == len(corrupt)  # each corrupt sample counted once in the epoch


def test_a_resume_under_the_same_layout_after_an_elastic_one_continues_exactly(tmp_path):
    srcs = sources(tmp_path, {(1, 4), (5, 0)})
    first = Ranks(srcs, world=2, workers=1, batch=3)
    first.steps(2)
    state = first.state()
    uninterrupted = Ranks(srcs, world=1, workers=1, batch=6, state=state).steps()
    cut = Ranks(srcs, world=1, workers=1, batch=6, state=state)
    head = cut.steps(2)
    rest = Ranks(srcs, world=1, workers=1, batch=6, state=cut.state()).steps()
    assert head + rest == uninterrupted and len(uninterrupted) > 3


def test_a_changed_step_size_is_said_and_the_epoch_stays_exact(tmp_path, caplog):
    srcs = sources(tmp_path, {(1, 4), (5, 0)})
    first = Ranks(srcs, world=2, workers=1, batch=3)
    trained = first.steps(2)
    with caplog.at_level(logging.WARNING):
        second = Ranks(srcs, world=3, workers=1, batch=3, state=first.state())
    assert "samples per step change from 6 to 9" in caplog.text
    trained += second.steps()
    seen = [k for step in trained for k in step]
    assert len(seen) == len(set(seen))


def test_the_consumed_samples_follow_from_the_saved_positions_alone(tmp_path):
    """The state holds positions and a segment's bits, nothing per sample; the samples it says were
    consumed (Consumed.add_read over each lane's read order) are exactly those trained or passed over."""
    corrupt = {(1, 4), (5, 0)}
    srcs = sources(tmp_path, corrupt)
    ranks = Ranks(srcs, world=2, workers=1, batch=3)
    trained = [k for step in ranks.steps(4) for k in step]
    state = ranks.state()
    assert state["base"] is None and state["repeated"] == [0, 0] and state["consumed"] == 4
    assert state["lanes"][:, 0].tolist() == [0, 1] and tuple(state["segments"].shape) == (2, 1)  # 6 bits, a word
    stream = ranks.loaders[0].dataset
    base = Consumed(stream.shards.counts)
    plan = stream.plan_for(0, None)
    for lane, pos in saved_lanes(state).items():
        start = pos[1] * stream.segment
        bits = stream.segment_bits(plan, lane, pos)
        base.add_read(Consumed(stream.shards.counts), slot_read_order(plan, lane, 5, 0, 0, 0), start, bits, start)
    shard_of = {url: i for i, url in enumerate(stream.shards.urls)}
    consumed = {
        (shard, j)
        for shard in range(len(stream.shards.urls))
        for j in range(stream.shards.counts[shard])
        if base.done(shard, j)
    }
    keys = {f"p{i}_{j:06d}": (shard_of[url], j) for i, url in enumerate(stream.shards.urls) for j in range(COUNTS[i])}
    passed = {(s, j) for s, j in corrupt if (s, j) in consumed}
    assert consumed == {keys[k] for k in trained} | passed and len(trained) == 24


def test_the_epoch_length_survives_any_number_of_resumes(tmp_path):
    """An elastic resume to more samples per step plans a longer epoch than a whole one on the new layout;
    a later resume on that same layout keeps that length (it used to fall back to the whole epoch's, and
    Lightning ended the epoch with samples untrained)."""
    srcs, valid = sources(tmp_path), valid_keys()
    first = Ranks(srcs, world=1, workers=1, batch=3)
    trained = first.steps(2)
    second = Ranks(srcs, world=2, workers=1, batch=3, state=first.state())
    length = len(second.loaders[0].dataset)
    assert length == 2 + 8 > second.loaders[0].dataset.full_batches == 9  # 53 left: 26 per slot, 8 batches
    trained += second.steps(3)
    third = Ranks(srcs, world=2, workers=1, batch=3, state=second.state())
    assert len(third.loaders[0].dataset) == length
    trained += third.steps()
    assert len(trained) == length
    seen = [k for step in trained for k in step]
    assert len(seen) == len(set(seen)) and len(valid) - len(seen) == 53 - 2 * 8 * 3  # the declared remainder
