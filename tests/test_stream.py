"""Streaming from real shards: splitting across ranks and workers, epochs, mixing, skipping."""

from collections import Counter

import numpy as np
import pytest

from aimv2.data.samples import decode_image
from aimv2.data.shardlist import resolve_shards
from aimv2.data.stream import EpochAwareLoader, ShardStream, StreamSource, plan_epoch
from aimv2.errors import UserError
from conftest import write_caption_shards


def key_of(sample):
    return sample["__key__"]


def key_if_decodable(sample):
    decode_image(sample)  # raises CorruptSample
    return sample["__key__"]


def collate_keys(items):
    return {"keys": list(items)}


def make_stream(sources, process=key_of, **kw):
    kw.setdefault("batch_size", 4)
    return ShardStream(sources, process=process, collate=collate_keys, **kw)


def epoch_keys(stream, num_workers, epochs=1):
    loader = EpochAwareLoader(stream, num_workers=num_workers)
    out = []
    for _ in range(epochs):
        out.append([b["keys"] for b in loader])
    return out


def source(tmp_path, name, n, per_shard, **kw):
    report = write_caption_shards(tmp_path / name, n, per_shard, prefix=name, **kw)
    return StreamSource(name, resolve_shards(report.urls, name, need_counts=True))


def test_plan_epoch_cuts_the_shards_into_equal_contiguous_ranges():
    plan = plan_epoch(np.array([10, 10, 4, 5]), num_slots=3, batch_size=4)  # 29 samples: 9, 10, 10
    assert [plan.slot_units(s) for s in range(3)] == [
        [(0, 0, 9)],
        [(0, 9, 10), (1, 0, 9)],
        [(1, 9, 10), (2, 0, 4), (3, 0, 5)],
    ]
    assert [plan.slot_size(s) for s in range(3)] == [9, 10, 10]
    assert plan.batches_per_slot == 2  # 29 // 3 = 9 samples per slot, 2 batches of 4


def test_plan_epoch_with_fewer_shards_than_slots_gives_each_slot_part_of_a_shard():
    plan = plan_epoch(np.array([7, 5]), num_slots=3, batch_size=2)
    assert [plan.slot_units(s) for s in range(3)] == [[(0, 0, 4)], [(0, 4, 7), (1, 0, 1)], [(1, 1, 5)]]
    assert plan.batches_per_slot == 2
    seeded = plan_epoch(np.array([7, 0, 5]), num_slots=3, batch_size=2, seed=1)  # shards without samples left out
    assert sorted(u for s in range(3) for u in seeded.slot_units(s))[0][0] in (0, 2) and 1 not in seeded.order


def test_a_plan_at_the_recipes_scale_is_arrays_over_shards():
    """350,000 shards of about 10,000 samples over 2,048 slots: O(shards) arrays, a slot's ranges found
    by bisection, every sample in exactly one slot."""
    counts = np.random.default_rng(0).integers(9_990, 10_001, 350_000)
    plan = plan_epoch(counts, num_slots=2048, batch_size=32, seed=3)
    assert plan.total == counts.sum() and plan.order.nbytes + plan.ends.nbytes == 350_000 * 16
    sizes = [sum(end - first for _, first, end in plan.slot_units(s)) for s in (0, 1000, 2047)]
    assert sizes == [plan.slot_size(s) for s in (0, 1000, 2047)] and abs(sizes[0] - counts.sum() / 2048) <= 1


@pytest.mark.parametrize("num_shards,world,workers", [(7, 2, 2), (3, 2, 2), (5, 3, 1)])
def test_epoch_mode_ranks_get_equal_batches_and_disjoint_samples(tmp_path, num_shards, world, workers):
    src = source(tmp_path, "s", num_shards * 10, 10)
    per_rank = []
    for rank in range(world):
        stream = make_stream([src], mode="epoch", rank=rank, world_size=world, num_workers=workers, shuffle_buffer=8)
        (batches,) = epoch_keys(stream, workers)
        assert len(batches) == len(stream)  # __len__ is what the loader yields
        assert all(len(b) == 4 for b in batches)
        per_rank.append([k for b in batches for k in b])
    assert len({len(keys) for keys in per_rank}) == 1, "ranks must run the same number of steps"
    seen = Counter(k for keys in per_rank for k in keys)
    assert max(seen.values()) == 1, "a sample was read twice within an epoch"
    slots = world * workers
    assert len(seen) >= num_shards * 10 - slots * 4 - 10 * slots  # only remainders are dropped


def test_epochs_reshuffle_but_cover_the_same_samples(tmp_path):
    src = source(tmp_path, "s", 40, 10)
    stream = make_stream([src], mode="epoch", num_workers=0, shuffle_buffer=16)
    first, second = epoch_keys(stream, 0, epochs=2)
    flat1, flat2 = [k for b in first for k in b], [k for b in second for k in b]
    assert sorted(flat1) == sorted(flat2) and len(flat1) == 40
    assert flat1 != flat2


def test_corrupt_samples_are_skipped_and_counted_exactly(tmp_path):
    # 31 samples (3 corrupt), batch 4: the manifest plans 7 batches = 28 samples = all valid ones.
    src = source(tmp_path, "s", 31, 10, corrupt_at={3, 14, 15})
    stream = ShardStream(
        [src], process=key_if_decodable, collate=collate_keys, batch_size=4, mode="epoch", shuffle_buffer=0
    )
    batches = list(EpochAwareLoader(stream, num_workers=0))
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == 7 and sum(int(b["skipped"]) for b in batches) == 3
    assert sorted(keys) == [f"s{i:06d}" for i in range(31) if i not in {3, 14, 15}]


def test_corrupt_samples_make_batches_lighter_never_fewer_and_nothing_repeats(tmp_path):
    # 30 samples (4 corrupt), batch 3: 10 batches planned and no slack; 26 usable samples. Every batch is
    # still there (ranks keep their step count), each usable sample trained once, the corrupt ones counted.
    src = source(tmp_path, "s", 30, 10, corrupt_at={1, 2, 3, 17})
    stream = ShardStream(
        [src], process=key_if_decodable, collate=collate_keys, batch_size=3, mode="epoch", shuffle_buffer=0
    )
    loader = EpochAwareLoader(stream, num_workers=0)
    for _ in range(2):  # the next epoch the same: no rank-local knowledge of corrupt samples shapes a plan
        batches = []
        for batch in loader:
            batches.append(batch)
            loader.mark_consumed(batch["stream_pos"], batch["repeated"])
        keys = [k for b in batches for k in b["keys"]]
        assert len(batches) == len(stream) == 10
        assert sorted(keys) == [f"s{i:06d}" for i in range(30) if i not in {1, 2, 3, 17}]
        assert sum(int(b["skipped"]) for b in batches) == 4 and loader.repeated == 0
        # No slack (30 = 10 x 3): batch k ends after raw sample 3(k + 1), its corrupt ones skipped, unless
        # all 3 were corrupt: then it reads on to its first usable one (and the next batch is lighter).
        ends = [b["stream_pos"][3] for b in batches]  # raw samples read after each batch (segment 0)
        assert (
            all(
                end == 3 * (k + 1) or (end > 3 * (k + 1) and len(b["keys"]) == 1)
                for k, (end, b) in enumerate(zip(ends, batches))
            )
            and ends[-1] == 30
        )
        assert [len(b["keys"]) + int(b["skipped"]) for b in batches] == [e - s for s, e in zip([0] + ends, ends)]


def test_a_range_whose_tail_is_corrupt_refills_with_counted_repeats(tmp_path):
    # 12 samples, the last 8 corrupt, batch 2: 6 batches due and 4 usable samples. The first batches take
    # them; once the range has no raw sample left, each due batch is one repeated sample, counted.
    src = source(tmp_path, "s", 12, 12, corrupt_at=set(range(4, 12)))
    stream = ShardStream(
        [src], process=key_if_decodable, collate=collate_keys, batch_size=2, mode="epoch", shuffle_buffer=0
    )
    loader = EpochAwareLoader(stream, num_workers=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        loader.mark_consumed(batch["stream_pos"], batch["repeated"])
    assert [len(b["keys"]) for b in batches] == [2, 2, 1, 1, 1, 1]
    assert [b["repeated"] for b in batches] == [0, 0, 1, 1, 1, 1] and loader.repeated == 4
    assert [k for b in batches[2:] for k in b["keys"]] == [f"s{i:06d}" for i in range(4)]
    assert sum(int(b["skipped"]) for b in batches) == 8


def test_resampled_mixes_sources_by_weight_and_never_ends(tmp_path):
    a = source(tmp_path, "a", 20, 10)
    b = source(tmp_path, "b", 20, 10)
    a.weight, b.weight = 3.0, 1.0
    stream = make_stream([a, b], mode="resampled", batch_size=10, shuffle_buffer=0)
    keys = []
    for batch in stream:
        keys += batch["keys"]
        if len(keys) >= 800:  # 20x the data: the stream is infinite
            break
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert share_a == pytest.approx(0.75, abs=0.05)


def test_resampled_is_seeded_per_rank(tmp_path):
    src = source(tmp_path, "s", 50, 10)

    def first_keys(rank, seed):
        it = iter(make_stream([src], mode="resampled", rank=rank, world_size=2, seed=seed, shuffle_buffer=10))
        return [k for _ in range(5) for k in next(it)["keys"]]

    assert first_keys(0, 1) == first_keys(0, 1)
    assert first_keys(0, 1) != first_keys(1, 1)
    assert first_keys(0, 1) != first_keys(0, 2)


def test_missing_shard_is_named(tmp_path):
    write_caption_shards(tmp_path / "s", 20, 10)
    with pytest.raises(UserError, match=r"shard not found: .*00002\.tar"):
        resolve_shards(str(tmp_path / "s" / "{00000..00002}.tar"), "data.sources.0.urls", need_counts=True)


def test_epoch_mode_without_a_full_batch_per_slot_is_an_error(tmp_path):
    src = source(tmp_path, "s", 6, 3)
    with pytest.raises(ValueError, match="without one full batch"):
        make_stream([src], mode="epoch", world_size=2, num_workers=2, batch_size=4)


def test_shards_without_manifest_are_counted_from_the_tar(tmp_path):
    report = write_caption_shards(tmp_path / "s", 12, 5)
    for stats in (tmp_path / "s").glob("*_stats.json"):
        stats.unlink()
    infos = resolve_shards(report.urls, "k", need_counts=True)
    assert [i.count for i in infos] == [5, 5, 2]
