"""Elastic resume of the epoch-mode stream at the loader level: an epoch cut under one layout (ranks x
workers x batch per rank) continues under another and still sees every sample once, the new plan's
declared drop-last remainder aside. Ranks are simulated in one process (each rank's loader is what a
DDP rank runs; their saved states are merged the way the all-gather merges them); tests/
test_elastic_resume.py does the same with real DDP processes killed by SIGKILL."""

import logging
import re

import numpy as np
import torch

from aimv2.data.loader import EpochAwareLoader
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
        report = write_caption_shards(tmp_path / f"p{i}", n, 100, prefix=f"p{i}_", seed=i,
                                      corrupt_at={j for s, j in corrupt if s == i})
        out.extend(resolve_shards(report.urls, "s", need_counts=True))
    return [StreamSource("s", out)]


class Ranks:
    """`world` loaders, one per simulated rank, each with the same layout."""

    def __init__(self, srcs, world, workers, batch, state=None):
        self.loaders = []
        for rank in range(world):
            stream = ShardStream(srcs, process=key_of, collate=collate, batch_size=batch, mode="epoch",
                                 rank=rank, world_size=world, num_workers=workers, shuffle_buffer=4, seed=5)
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
                loader.mark_consumed(batch["stream_pos"], batch["ids"], batch["skipped_ids"])
                keys += batch["keys"]
                self.skipped += int(batch["skipped"])
            trained.append(keys)
        return trained

    def state(self) -> dict:
        """What rank 0 saves: every collective of `position_state` answered with all ranks' tensors."""
        calls = []
        for loader in self.loaders:
            mine = []
            loader._gather = lambda t, mine=mine: (mine.append(t), t[None])[1]
            loader.position_state()
            calls.append(mine)
        for loader in self.loaders:
            it = iter(range(len(calls[0])))
            loader._gather = lambda t, it=it: (lambda i: torch.stack([rank[i] for rank in calls]))(next(it))
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
    assert [l.repeated for l in third.loaders] == [0, 0, 0]
    # The next epoch under the new layout is a whole, fresh one.
    third.iters = [iter(loader) for loader in third.loaders]
    nxt = [k for step in third.steps() for k in step]
    plan = third.loaders[0].dataset.plan  # whole shards per slot: its own remainder (7 shards, 6 slots)
    assert len(nxt) == len(set(nxt)) == plan.batches_per_slot * 6 * 2


def test_corrupt_samples_across_a_layout_change_are_counted_once_and_repeats_are_counted(tmp_path, caplog):
    corrupt = {(1, 4), (5, 0)}
    srcs, valid = sources(tmp_path, corrupt), valid_keys(corrupt)
    first = Ranks(srcs, world=2, workers=1, batch=3)
    trained, skipped = first.steps(3), first.skipped
    second = Ranks(srcs, world=3, workers=2, batch=2, state=first.state())
    trained += second.steps()
    skipped += second.skipped
    seen = [k for step in trained for k in step]
    assert set(seen) <= valid
    # A slot that meets a corrupt sample of its plan falls short and refills from its own samples:
    # every repeat is one the ranks' ledgers counted (data/repeated_samples), none is silent.
    assert len(seen) - len(set(seen)) == sum(l.repeated for l in second.loaders)
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


def test_the_saved_ledger_is_the_union_of_the_ranks_ledgers(tmp_path):
    srcs = sources(tmp_path, {(1, 4), (5, 0)})
    ranks = Ranks(srcs, world=2, workers=1, batch=3)
    ranks.steps(4)
    state = ranks.state()
    ledger = np.unpackbits(state["ledger"].numpy(), count=sum(COUNTS)).astype(bool)
    union = ranks.loaders[0].ledger | ranks.loaders[1].ledger
    assert (ledger == union).all() and 24 <= ledger.sum() <= 24 + 2  # 4 steps x 6, plus corrupt ones passed
    assert state["repeated"] == [0, 0] and state["consumed"] == 4
