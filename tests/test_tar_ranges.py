"""Reading ranges of tar shards from their first sample (aimv2.data.tar_ranges): header offsets of the
project's own shards, samples identical to a read from each shard's start, and the fallbacks (a shard not
grouped by key, a shard changed since it was indexed, remote shards) read from the start."""

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from aimv2.data.every_sample import first_samples, plan_ranges, read_cost
from aimv2.data.tar_ranges import ScanStats, index_ranges, read_ranges, sample_starts, slot_starts
from conftest import jpeg_bytes, write_caption_shards

SEEK_N, SEEK_PER, SEEK_CORRUPT = 45, 17, {3, 20, 40}  # shards of 17, 17, 11 samples; 3 corrupt
WORLD, WORKERS = 4, 2  # 8 slots of 5 or 6 samples, most starting inside a shard


@pytest.fixture(scope="module")
def seek_ranges(tmp_path_factory):
    root = tmp_path_factory.mktemp("seek")
    report = write_caption_shards(root, SEEK_N, SEEK_PER, prefix="s", seed=2, corrupt_at=SEEK_CORRUPT)
    return first_samples(report.urls, 0, "val")


def read_from_shard_starts(units):
    """The reading before the index, written out: each range's shard read by webdataset from its start,
    its samples first..end-1 kept."""
    out = []
    for url, first, end in units:
        for j, sample in enumerate(wds.tarfile_to_samples()([{"url": url}])):
            if j >= end:
                break
            if j >= first:
                out.append(sample)
    return out


def without_index(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k != "__index__"}


def test_header_offsets_of_the_writers_shards_locate_every_sample(tmp_path):
    """Every sample of shards from aimv2.data.shards.write_shards, short keys and keys too long for a ustar
    header (a pax header before the member): the offset is its first header, and a stream from there starts
    with it."""
    from aimv2.data.shards import ShardSample, write_shards

    rng = np.random.default_rng(3)
    keys = [f"k{i:03d}" if i % 3 else f"{'long' * 30}_{i:03d}" for i in range(12)]
    report = write_shards(
        (ShardSample(key=k, image=jpeg_bytes(rng), image_ext="jpg", caption=f"sample {i}") for i, k in enumerate(keys)),
        tmp_path,
        samples_per_shard=7,
        verify_images=False,
        progress=False,
    )
    for url, _, end in first_samples(report.urls, 0, "val"):
        stats = ScanStats()
        starts = sample_starts(url, range(end), stats)
        assert sorted(starts) == list(range(end)) and starts[0][0] == 0
        assert stats.headers == 3 * (end - 1) + 1
        shard_keys = keys[:7] if url.endswith("00000.tar") else keys[7:]
        assert [key for _, key in starts.values()] == shard_keys
        offsets = [offset for offset, _ in starts.values()]
        assert offsets == sorted(offsets) and all(o % 512 == 0 for o in offsets)
        want = read_from_shard_starts([(url, 0, end)])
        with open(url, "rb") as f:
            for j, (offset, key) in starts.items():
                f.seek(offset)
                block = f.read(512)
                assert block[156:157] == (b"x" if len(key) > 90 else b"0")  # a pax header, or the member's own
                got = list(read_ranges([(url, j, j + 1)], {(url, j): (offset, key)}))
                assert [(passed, without_index(s)) for passed, s in got] == [(1, want[j])]


def write_tar(path, names: list[str]) -> str:
    """A tar holding `names` in that order (name.jpg: an image, others: a caption)."""
    rng = np.random.default_rng(4)
    with tarfile.open(path, "w") as tar:
        for name in names:
            data = jpeg_bytes(rng) if name.endswith(".jpg") else name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_shard_not_grouped_by_key_is_read_from_its_start_with_a_warning(tmp_path, caplog):
    """k1's and k2's members interleaved: webdataset reads k1, k2 (images), k1, k2 (captions) as four samples.
    The walk sees k1 come back: no index for the shard, a one-line warning naming it, and its slots read it
    from its start, so they see what they saw before."""
    order = ["k0.jpg", "k0.txt", "k1.jpg", "k2.jpg", "k1.txt", "k2.txt"] + [
        f"k{i}.{e}" for i in range(3, 6) for e in ("jpg", "txt")
    ]
    url = write_tar(tmp_path / "00000.tar", order)
    ranges = first_samples(url, 0, "val")
    assert ranges == [(url, 0, 6)]  # six keys with an image
    slots = plan_ranges(ranges, 3).slots  # [0, 2), [2, 4), [4, 6) of webdataset's 8 groups
    with caplog.at_level("WARNING", logger="aimv2.data.tar_ranges"):
        index = index_ranges(slots)
    assert index == {}
    [message] = [r.getMessage() for r in caplog.records if r.name == "aimv2.data.tar_ranges"]
    assert url in message and "'k1'" in message and "not consecutive" in message and "\n" not in message
    for units in slots:
        got = list(read_ranges(units, slot_starts([units], index)))
        assert [without_index(s) for _, s in got] == read_from_shard_starts(units)
    assert [s["__key__"] for units in slots for _, s in read_ranges(units, {})] == ["k0", "k1", "k2", "k1", "k2", "k3"]


def test_a_shard_changed_since_it_was_indexed_is_read_from_its_start(seek_ranges, caplog):
    ranges = seek_ranges
    url = ranges[0][0]
    units = [(url, 5, 8)]
    with caplog.at_level("WARNING", logger="aimv2.data.tar_ranges"):
        got = list(read_ranges(units, {(url, 5): (0, "s000005")}))  # offset 0 holds s000000 now
    assert "changed since it was indexed" in caplog.text
    assert [without_index(s) for _, s in got] == read_from_shard_starts(units)
    assert sum(passed for passed, _ in got) == 1 + 8  # the sample found at the stale offset, then 0..7


def test_remote_shards_are_read_from_their_start(seek_ranges):
    ranges = seek_ranges
    remote = [(f"pipe:cat {url}", first, end) for url, first, end in ranges]
    plan = plan_ranges(remote, WORLD, WORKERS)
    slots = plan.slots
    stats = ScanStats()
    assert index_ranges(slots, stats=stats) == {} and stats.shards == 0  # nothing to seek in: nothing read
    cost = read_cost(plan)
    assert cost["per_slot_after"] == cost["per_slot_before"] and cost["scan_shards"] == 0
    for p, units in enumerate(slots):
        got = list(read_ranges(units, {}))
        assert sum(passed for passed, _ in got) == cost["per_slot_after"][p]
        assert [without_index(s) for _, s in got] == read_from_shard_starts(units)
