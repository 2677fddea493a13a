"""Streaming from real shards: splitting across ranks and workers, epochs, mixing, skipping."""

from collections import Counter

import pytest

from aimv2.data.samples import decode_image
from aimv2.data.shardlist import ShardInfo, resolve_shards
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
    shards = [ShardInfo("a", 10), ShardInfo("b", 10), ShardInfo("c", 4), ShardInfo("d", 5)]
    plan = plan_epoch(shards, num_slots=3, batch_size=4)  # 29 samples: 9, 10, 10 (bounds 0, 9, 19, 29)
    assert plan.slot_units == [[("a", 0, 9)], [("a", 9, 10), ("b", 0, 9)], [("b", 9, 10), ("c", 0, 4), ("d", 0, 5)]]
    assert plan.batches_per_slot == 2  # 29 // 3 = 9 samples per slot, 2 batches of 4


def test_plan_epoch_with_fewer_shards_than_slots_gives_each_slot_part_of_a_shard():
    plan = plan_epoch([ShardInfo("a", 7), ShardInfo("b", 5)], num_slots=3, batch_size=2)
    assert plan.slot_units == [[("a", 0, 4)], [("a", 4, 7), ("b", 0, 1)], [("b", 1, 5)]]
    assert plan.batches_per_slot == 2
    seeded = plan_epoch([ShardInfo("a", 7), ShardInfo("b", 5)], num_slots=3, batch_size=2, seed=1)
    assert sorted(u for slot in seeded.slot_units for u in slot)[0][0] in ("a", "b")


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
    stream = ShardStream([src], process=key_if_decodable, collate=collate_keys, batch_size=4,
                         mode="epoch", shuffle_buffer=0)
    batches = list(EpochAwareLoader(stream, num_workers=0))
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == 7 and sum(int(b["skipped"]) for b in batches) == 3
    assert sorted(keys) == [f"s{i:06d}" for i in range(31) if i not in {3, 14, 15}]


def test_slot_short_of_its_planned_batches_refills_counting_repeats_and_each_corrupt_sample_once(tmp_path):
    # 30 samples (3 corrupt), batch 3: 10 batches planned, 27 valid samples fill only 9. The refill pass
    # re-reads the slot's shards: corrupt samples it passes again are not counted again, and the 3
    # samples it trains on a second time are counted as repeats by the loader's ledger.
    src = source(tmp_path, "s", 30, 10, corrupt_at={1, 2, 3})
    stream = ShardStream([src], process=key_if_decodable, collate=collate_keys, batch_size=3,
                         mode="epoch", shuffle_buffer=0)
    loader = EpochAwareLoader(stream, num_workers=0)
    batches, repeats = [], []
    for batch in loader:
        batches.append(batch)
        repeats.append(loader.mark_consumed(batch["stream_pos"], batch["ids"], batch["skipped_ids"]))
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == len(stream) == 10
    assert set(keys) == {f"s{i:06d}" for i in range(30) if i not in {1, 2, 3}}
    assert sum(int(b["skipped"]) for b in batches) == 3  # once per epoch, not 6
    assert repeats == [0] * 9 + [3] and loader.repeated == 3
    assert set(batches[-1]["keys"]) <= {k for b in batches[:-1] for k in b["keys"]}
    assert loader.ledger.sum() == 30  # every sample trained on or passed over
    # The next epoch is planned without the 3 samples found corrupt: 9 batches, no refill, no repeat.
    second = []
    for batch in loader:
        second.append(batch)
        loader.mark_consumed(batch["stream_pos"], batch["ids"], batch["skipped_ids"])
    keys = [k for b in second for k in b["keys"]]
    assert len(second) == 9 and sorted(keys) == sorted(set(keys)) and len(set(keys)) == 27
    assert sum(int(b["skipped"]) for b in second) == 0 and loader.repeated == 3


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
