"""The one evaluation reader (aimv2.data.every_sample) reading whole shards, as probes and compressor
evaluation use it: every sample exactly once over any number of ranks and workers, in shard order, the
last partial batch included, and every corrupt sample counted -- a tail of corrupt samples too. Its
sample-range plans (pre-training's validation) are tested in tests/test_validation_loss.py."""

from __future__ import annotations

import pytest

from aimv2.config import TokenizerConfig
from aimv2.data.every_sample import every_sample_loader, plan_whole_shards
from aimv2.data.samples import CorruptSample, ImageCaptionCollator, decode_caption, decode_image
from aimv2.data.shardlist import ShardInfo, resolve_shards
from aimv2.data.tokenizer import build_tokenizer
from conftest import write_caption_shards

N, CORRUPT = 23, (4, 21, 22)  # 21 and 22: the last two samples of the last shard


def _keys(sample: dict) -> tuple[str, str]:
    decode_image(sample)  # raises CorruptSample on the planted bytes
    return sample["__key__"], decode_caption(sample)


def _collate_keys(items: list) -> dict:  # module level: workers receive it pickled (a fork server's)
    return {"keys": [k for k, _ in items]}


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 1), (3, 2), (8, 0)])
def test_every_sample_once_and_every_corrupt_one_counted(tmp_path, world, workers):
    report = write_caption_shards(tmp_path / "s", N, per_shard=5, corrupt_at=CORRUPT)
    shards = resolve_shards(report.urls, "val", need_counts=False)
    keys, skipped = [], 0
    for rank in range(world):
        for batch in every_sample_loader(plan_whole_shards(shards, world, workers), _keys, _collate_keys, 4, rank):
            assert len(batch["keys"]) <= 4
            keys += batch["keys"]
            skipped += int(batch["skipped"])
    assert sorted(keys) == [f"{i:06d}" for i in range(N) if i not in CORRUPT] and skipped == len(CORRUPT)


def test_batches_are_every_batch_size_planned_samples_whichever_are_corrupt(tmp_path):
    """Batch boundaries follow from the plan: samples 0-3, 4-7 (4 corrupt), ..., 20-22 (21, 22 corrupt)."""
    report = write_caption_shards(tmp_path / "s", N, per_shard=5, corrupt_at=CORRUPT)
    shards = resolve_shards(report.urls, "val", need_counts=False)
    batches = list(every_sample_loader(plan_whole_shards(shards), _keys, _collate_keys, 4))
    assert [(len(b["keys"]), int(b["skipped"]), int(b["read"])) for b in batches] == [
        (4, 0, 4),
        (3, 1, 4),
        (4, 0, 4),
        (4, 0, 4),
        (4, 0, 4),
        (1, 2, 3),
    ]


def test_one_process_reads_in_shard_order_and_collates_image_captions(tmp_path):
    import torchvision.transforms.functional as F

    report = write_caption_shards(tmp_path / "s", 9, per_shard=3, corrupt_at=(8,))
    shards = resolve_shards(report.urls, "val", need_counts=False)
    keys = [k for b in every_sample_loader(plan_whole_shards(shards), _keys, _collate_keys, 4) for k in b["keys"]]
    assert keys == [f"{i:06d}" for i in range(8)]
    collate = ImageCaptionCollator(build_tokenizer(TokenizerConfig(max_length=8)))

    def process(sample: dict):
        return F.to_tensor(decode_image(sample).resize((4, 4))), decode_caption(sample)

    batches = list(every_sample_loader(plan_whole_shards(shards), process, collate, 4))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 0]  # the last: the corrupt tail's count alone
    assert [int(b["skipped"]) for b in batches] == [0, 0, 1] and batches[-1]["tokens"].shape == (0, 8)
    with pytest.raises(CorruptSample):
        process({"__key__": "x", "jpg": b"nope", "txt": b"a"})


def test_whole_shards_go_biggest_first_to_the_emptiest_slot():
    shards = [ShardInfo(f"{i}.tar", count) for i, count in enumerate([5, 9, 2, 7, 4])]
    plan = plan_whole_shards(shards, world=1, num_workers=2)
    assert (plan.workers, plan.stride) == (2, 1)
    assert [[url for url, _, _ in slot] for slot in plan.slots] == [["1.tar", "4.tar"], ["3.tar", "0.tar", "2.tar"]]
    unknown = plan_whole_shards([ShardInfo(f"{i}.tar", -1) for i in range(4)], world=1, num_workers=2)
    assert [[url for url, _, _ in slot] for slot in unknown.slots] == [["0.tar", "2.tar"], ["1.tar", "3.tar"]]
    few = plan_whole_shards(shards[:2], world=3, num_workers=4)  # fewer shards than ranks: every slot reads both
    assert (few.workers, few.stride, few.slots) == (1, 3, [[("0.tar", 0, None), ("1.tar", 0, None)]] * 3)
