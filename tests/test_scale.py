"""The scale simulator (benchmarks/scale.py) at a reduced size: the sizes and counts it reports are
deterministic, so they are asserted (never times); and the positions it computes for "K steps into an
epoch" are the ones the real stream reaches, reading virtual tars."""

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import scale  # noqa: E402
import virtual_data  # noqa: E402

SIZE = virtual_data.SIZES["small"]


@pytest.fixture(scope="module")
def result():
    return scale.measure(SIZE, masks=False)


def test_start_reads_one_manifest_per_source_on_one_rank_only(result):
    start, bare = result["start"], result["start_without_manifest"]
    sources, shards = len(SIZE.shards), sum(SIZE.shards)
    assert start["rank_ops"] == {"stat": sources}  # every rank: the first shard of each source exists
    assert start["rank0_ops"] == {"stat": sources, "open": sources}  # and rank 0 reads each source's manifest
    # without manifests rank 0 (only) stats each shard and reads its stats file and first 4 KiB
    # (and looks for each directory's manifest first)
    assert bare["rank0_ops"] == {"stat": sources + shards, "open": 2 * shards + sources}
    assert bare["rank_ops"] == {"stat": sources}
    assert start["total_ops"] == 2 * sources + (SIZE.world - 1) * sources


def test_nothing_of_the_epoch_state_grows_with_the_samples(result):
    epoch, tenfold = result["epoch"], result["epoch_tenfold"]
    assert tenfold["total"] == 10 * epoch["total"]
    assert tenfold["checkpoint_bytes"] == epoch["checkpoint_bytes"] and tenfold["gather"] == epoch["gather"]
    assert tenfold["plan_bytes"] == epoch["plan_bytes"] == 16 * sum(SIZE.shards)  # order and ends, int64
    # a row per lane: lane, consumed, repeated, its 7 position fields, the bits of a 4096-sample segment
    rows, columns = SIZE.workers, 3 + 7 + 4096 // 64
    assert epoch["gather"] == {"sent": rows * columns * 8, "received": SIZE.world * rows * columns * 8}


def test_resumes_on_other_layouts_plan_exactly_the_samples_left(result):
    epoch = result["epoch"]
    assert set(epoch["resumes"]) == set(SIZE.resumes)
    for world, resumed in epoch["resumes"].items():
        assert resumed["left"] == epoch["total"] - epoch["consumed_samples"]  # (also asserted by the simulator)
        assert resumed["gather"]["received"] == world * resumed["gather"]["sent"]


def test_resampled_state_is_the_same_size_at_any_step(result):
    res = result["resampled"]
    assert res["step 0"]["gather"] == res["step 1.46M"]["gather"]
    # the tables are the same; a scalar step counter pickles a few bytes wider, and torch.save pads to 64
    assert abs(res["step 0"]["checkpoint_bytes"] - res["step 1.46M"]["checkpoint_bytes"]) <= 64
    assert res["resumes"][max(SIZE.resumes)]["lanes"] == max(SIZE.resumes) * SIZE.workers  # fresh lanes added
    assert res["resumes"][min(SIZE.resumes)]["lanes"] == SIZE.world * SIZE.workers  # lanes kept


def test_validation_reads_only_its_samples(result):
    assert [v["after"] for v in result["validation"]] == [1.0] * 4
    assert [v["before"] > 1.25 for v in result["validation"]] == [True] * 4


def test_the_simulated_positions_are_the_real_streams(tmp_path):
    """`epoch_position` (K full batches into an epoch) against the real stream reading virtual tars: the
    same stream_pos after every batch, so the simulated checkpoint is the one a real run would write."""
    cfg, ops = virtual_data.virtual_set(tmp_path / "set", SIZE)
    sources = scale.start_up(cfg, ops, SIZE.world)["sources"]
    stream = virtual_data.stream_for(sources, SIZE, SIZE.world, rank=1)
    stream.segment = 10  # segments cross shards and batches

    def virtual_read(url, size=-1):
        return ({"__key__": f"{url}:{j}", "__url__": url} for j in range(ops.counts[url]))

    stream._read_one = virtual_read
    plan = stream.plan_for(0, None)
    for slot in (2, 3):  # rank 1's two slots, each as its worker runs it
        batches = stream._epoch_slot(slot, None, plan)
        for produced in range(1, 25):
            batch = next(batches)
            assert tuple(batch["stream_pos"][1:]) == virtual_data.epoch_position(stream, plan, slot, produced), produced
            assert len(batch["keys"]) == SIZE.batch
    expected = np.array(list(ops.counts.values())).sum()
    assert stream.total == expected
