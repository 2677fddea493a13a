"""Exact resume of the shard stream, at the loader level: cut an epoch after k consumed batches,
save the loader's state, restore it into a fresh loader, and the batches that follow (and the next
epoch) are exactly those of the uninterrupted stream: same samples, same order, same augmentation."""

import logging

import pytest
import torch

from aimv2.data.samples import decode_image
from aimv2.data.shardlist import resolve_shards
from aimv2.data.stream import EpochAwareLoader, ShardStream, StreamSource
from aimv2.errors import UserError
from conftest import write_caption_shards


def key_and_draw(sample):
    """Decodes (corrupt samples raise) and draws from the torch RNG like an augmentation does."""
    decode_image(sample)
    return sample["__key__"], float(torch.rand(()))


def collate(items):
    return {"keys": [k for k, _ in items], "draws": [d for _, d in items]}


def source(tmp_path, name, n, per_shard, **kw):
    report = write_caption_shards(tmp_path / name, n, per_shard, prefix=name, **kw)
    return StreamSource(name, resolve_shards(report.urls, name, need_counts=True))


def source_of(directory, name):
    return StreamSource(name, resolve_shards(str(directory / "{00000..00003}.tar"), name, need_counts=True))


def make_loader(sources, workers, segment, **kw):
    kw.setdefault("batch_size", 3)
    stream = ShardStream(sources, process=key_and_draw, collate=collate, num_workers=workers, **kw)
    stream.segment = segment  # small segments: cuts land inside, across and at segment boundaries
    world = kw.get("world_size", 1)  # one rank simulated: its table stands in for every rank's
    return EpochAwareLoader(stream, num_workers=workers, gather=lambda table: torch.stack([table] * world))


def summary(batch):
    return batch["keys"], batch["draws"]


def run(loader, epochs=1, stop_after=None):
    """Batches per epoch; with stop_after=k, consume only k batches of the first epoch."""
    out = []
    for _ in range(epochs):
        got = []
        for batch in loader:
            loader.mark_consumed(batch["stream_pos"], batch.get("repeated", 0))
            got.append(summary(batch))
            if stop_after is not None and len(got) == stop_after:
                return [got]
        out.append(got)
    return out


CASES = {
    # 5 shards of 8 over 2 workers (uneven packing), corrupt samples, segments of 7 raw samples
    "epoch-2-workers": dict(n=40, per_shard=8, corrupt={4, 17}, workers=2, segment=7, mode="epoch", shuffle_buffer=4),
    # 27 valid of 30 samples, 10 batches planned: lighter batches, none fewer
    "epoch-light-batches": dict(
        n=30, per_shard=10, corrupt={3, 14, 15}, workers=0, segment=9, mode="epoch", shuffle_buffer=0
    ),
    # a range whose tail is corrupt: its last batches come from a refill pass (counted repeats)
    "epoch-refill-pass": dict(
        n=20, per_shard=20, corrupt=set(range(8, 20)), workers=0, segment=5, mode="epoch", shuffle_buffer=0
    ),
    # 2 shards, 2 workers x 2 ranks = 4 slots > 2 shards: slots read parts of shards
    "epoch-parts-of-shards": dict(
        n=48, per_shard=24, corrupt=set(), workers=2, segment=5, mode="epoch", shuffle_buffer=3, world_size=2, rank=1
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_epoch_mode_continues_exactly_after_any_batch(tmp_path, name):
    case = dict(CASES[name])
    src = source(tmp_path, "s", case.pop("n"), case.pop("per_shard"), corrupt_at=case.pop("corrupt"))
    workers, segment = case.pop("workers"), case.pop("segment")
    full = run(make_loader([src], workers, segment, **case), epochs=2)
    per_epoch = len(full[0])
    keys = [k for keys, _ in full[0] for k in keys]
    if name != "epoch-refill-pass":  # a refill pass re-reads by design (test_stream.py)
        assert len(keys) == len(set(keys)), "a sample was read twice within the epoch"
    for k in sorted({1, 2, per_epoch // 2 + 1, per_epoch - 1, per_epoch}):
        first = make_loader([src], workers, segment, **case)
        (head,) = run(first, stop_after=k)
        state = first.position_state()
        second = make_loader([src], workers, segment, **case)
        second.load_position_state(state)
        rest = run(second, epochs=2)
        assert head + rest[0] == full[0], f"cut after {k} batches: the epoch does not continue exactly"
        assert rest[1] == full[1], f"cut after {k} batches: the next epoch differs"


def test_resampled_mode_continues_the_same_seeded_sequence(tmp_path):
    a, b = source(tmp_path, "a", 30, 10), source(tmp_path, "b", 20, 7, corrupt_at={5})
    a.weight, b.weight = 2.0, 1.0

    def first_batches(loader, k, state=None):
        if state is not None:
            loader.load_position_state(state)
        out = []
        for batch in loader:
            loader.mark_consumed(batch["stream_pos"], batch.get("repeated", 0))
            out.append(summary(batch))
            if len(out) == k:
                return out

    def loader():
        return make_loader([a, b], 2, 11, mode="resampled", shuffle_buffer=5, seed=3)

    full = first_batches(loader(), 30)
    assert len({k for keys, _ in full for k in keys}) > 30  # it really draws from both sources
    for k in (1, 4, 13):
        cut = loader()
        head = first_batches(cut, k)
        rest = first_batches(loader(), 30 - k, cut.position_state())
        assert head + rest == full, f"cut after {k} batches: the resampled sequence does not continue"


def lane_batches(loader, k, state=None) -> dict[int, list]:
    """The first k batches of a loader, by lane (stream_pos[0])."""
    if state is not None:
        loader.load_position_state(state)
    out: dict[int, list] = {}
    for i, batch in enumerate(loader):
        loader.mark_consumed(batch["stream_pos"])
        out.setdefault(int(batch["stream_pos"][0]), []).append(summary(batch))
        if i + 1 == k:
            return out


def test_resampled_lanes_continue_their_draws_on_fewer_and_on_more_slots(tmp_path, caplog):
    a, b = source(tmp_path, "a", 30, 10), source(tmp_path, "b", 20, 7)
    a.weight = 2.0

    def loader(workers=2, rank=0, world=1):
        return make_loader([a, b], workers, 11, mode="resampled", shuffle_buffer=5, seed=3, rank=rank, world_size=world)

    full = lane_batches(loader(), 16)  # lanes 0 and 1 (one per worker), 8 batches each
    cut = loader()
    head = lane_batches(cut, 5)  # lane 0: 3 batches, lane 1: 2
    state = cut.position_state()
    with caplog.at_level(logging.WARNING):
        one = loader(workers=1)  # 2 slots -> 1: the one slot runs both lanes in turn
        rest = lane_batches(one, 6, state)
    assert "its 2 lanes continue their seeded draws on 1 data slots" in caplog.text
    for lane in (0, 1):
        assert head[lane] + rest[lane] == full[lane][: len(head[lane]) + len(rest[lane])], f"lane {lane}"
    assert len(rest[0]) == len(rest[1]) == 3  # lane 1 (fewer batches) went first, then they alternated

    # 2 slots -> 3 (3 ranks of 1 worker): lanes 0 and 1 continue on ranks 0 and 1, rank 2 starts lane 2.
    more = [lane_batches(loader(workers=1, rank=r, world=3), 3, state) for r in range(3)]
    for lane in (0, 1):
        assert head[lane] + more[lane][lane] == full[lane][: len(head[lane]) + 3]
    assert list(more[2]) == [2] and more[2][2] != full[0][:3] and more[2][2] != full[1][:3]


def test_changed_data_is_refused_naming_the_shard(tmp_path):
    """A shard replaced by another of the same name and sample count but other bytes: the epoch's sample
    ids would point at other samples, so the resume stops with the shard named."""
    src = source(tmp_path, "s", 40, 10)
    one = make_loader([src], 2, 7, mode="epoch", shuffle_buffer=4)
    run(one, stop_after=3)
    state = one.position_state()
    write_caption_shards(tmp_path / "s", 40, 10, prefix="s", seed=9, overwrite=True)  # same names and counts
    changed = make_loader([source_of(tmp_path / "s", "s")], 2, 7, mode="epoch", shuffle_buffer=4)
    with pytest.raises(
        UserError,
        match=r"cannot resume the data stream: shard .*/s/0000\d\.tar is not the one the "
        r"checkpoint was trained on .*data\.on_change=restart",
    ):
        changed.load_position_state(state)
    fewer = make_loader([source(tmp_path, "t", 30, 10)], 2, 7, mode="epoch", shuffle_buffer=4)
    with pytest.raises(UserError, match=r"the sources \(name, weight, number of shards\) changed"):
        fewer.load_position_state(state)


def test_changed_data_with_on_change_restart_starts_a_fresh_sequence_with_a_warning(tmp_path, caplog):
    src, other = source(tmp_path, "s", 40, 10), source(tmp_path, "t", 30, 10)
    one = make_loader([src], 2, 7, mode="resampled", shuffle_buffer=4)
    (head,) = run(one, stop_after=3)
    changed = make_loader([other], 2, 7, mode="resampled", shuffle_buffer=4)
    changed.on_change = "restart"
    with caplog.at_level(logging.WARNING):
        changed.load_position_state(one.position_state())
    assert "data.on_change=restart: the sources" in caplog.text
    (fresh,) = run(changed, stop_after=3)
    (unrelated,) = run(make_loader([other], 2, 7, mode="resampled", shuffle_buffer=4), stop_after=3)
    assert fresh != unrelated, "a fresh sequence must not replay the run's first batches"


def test_the_shuffle_buffer_is_part_of_the_layout(tmp_path, caplog):
    """Another shuffle buffer is another order: the epoch continues elastically (every sample once), not
    by replaying positions the new buffer would read differently."""
    src = source(tmp_path, "s", 40, 10)
    one = make_loader([src], 0, 7, mode="epoch", shuffle_buffer=4)
    (head,) = run(one, stop_after=4)
    other = make_loader([src], 0, 7, mode="epoch", shuffle_buffer=6)
    other.dataset.segment = 7
    with caplog.at_level(logging.WARNING):
        other.load_position_state(one.position_state())
    assert "resuming epoch 0 under another data layout" in caplog.text
    (rest,) = run(other)
    keys = [k for batch, _ in head + rest for k in batch]
    assert len(keys) == len(set(keys)) == 39  # 40 samples, 13 batches of 3: one left over
