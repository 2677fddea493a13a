"""Native resolution, data side: grids under a patch budget, sizes read without decoding, first-fit
decreasing packing under a token budget, and a packed shard stream that continues exactly after any
batch and counts every corrupt sample once."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from aimv2.config.schema import TokenizerConfig
from aimv2.data.native import (
    NativeImageCaptionProcessor,
    NativeResizeFlip,
    PackedCollator,
    Packing,
    image_size,
    native_grid,
    pack_batches,
    padding_fraction,
    place_rows,
)
from aimv2.data.samples import CorruptSample, decode_image_tensor
from aimv2.data.shardlist import resolve_shards
from aimv2.data.shards import ShardSample, write_shards
from aimv2.data.stream import EpochAwareLoader, ShardStream, StreamSource
from aimv2.data.tokenizer import build_tokenizer

P = 14


def test_grids_keep_the_aspect_ratio_within_the_patch_budget():
    assert native_grid(126, 70, P, 8, 64) == (5, 9)  # its own size: 45 patches, within [8, 64]
    assert native_grid(224, 224, P, 8, 64) == (8, 8)  # 256 patches scaled down to 64
    gh, gw = native_grid(4000, 1000, P, 8, 64)  # 4:1 landscape -> 16 x 4 would be 64; floors to fit
    assert gh * gw <= 64 and abs(gw / gh - 4) < 0.5
    assert native_grid(28, 28, P, 16, 64) == (4, 4)  # 2 x 2 upscaled to the minimum
    assert native_grid(10_000, 100, P, 8, 64) == (1, 64)  # extreme ratios clamp, never exceed the budget
    # A narrow budget and a tall image: the grid grows in height when its width cannot grow.
    assert native_grid(256, 3298, P, 282, 289) == (71, 4)
    gh, gw = native_grid(91, 2012, P, 33, 45)
    assert 33 <= gh * gw <= 45
    with pytest.raises(ValueError, match="min_patches"):
        native_grid(100, 100, P, 1, 64)


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def test_sizes_come_from_the_json_or_the_header_never_from_decoding(tmp_path):
    data = jpeg(70, 42, 0)
    assert image_size({"jpg": data, "json": json.dumps({"width": 700, "height": 420}).encode()}) == (700, 420)
    assert image_size({"jpg": data, "json": b'{"caption": "no size"}'}) == (70, 42)
    with pytest.raises(CorruptSample, match="header"):
        image_size({"__key__": "k", "jpg": b"not an image"})
    # The project's writer records the size as img2dataset does.
    write_shards([ShardSample("a", data, "jpg", caption="x")], tmp_path, samples_per_shard=10, progress=False)
    sample = next(iter(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)))
    assert json.loads(sample["json"])[("width")] == 70 and json.loads(sample["json"])["height"] == 42


def test_first_fit_decreasing_by_hand():
    lengths = [5, 4, 3, 3, 1]
    assert place_rows(lengths, 8) == [[0, 2], [1, 3, 4]]  # 5+3 and 4+3+1: no padding
    assert pack_batches([6, 6, 6, 2], 8, 2) == [[[0, 3], [1]], [[2]]]
    assert padding_fraction([6, 6, 6, 2], pack_batches([6, 6, 6, 2], 8, 2), 8) == pytest.approx(1 - 20 / 24)
    with pytest.raises(ValueError, match="does not fit a row"):
        place_rows([9], 8)


SIZES = [(70, 42), (42, 98), (56, 56), (140, 28), (28, 70), (84, 84), (98, 42), (42, 42)]


def varied_shards(tmp_path, n: int, corrupt=()):
    samples = [
        ShardSample(
            f"s{i:04d}",
            b"not an image" if i in corrupt else jpeg(*SIZES[i % len(SIZES)], i),
            "jpg",
            caption=f"sample {i}",
        )
        for i in range(n)
    ]
    report = write_shards(samples, tmp_path / "shards", samples_per_shard=9, verify_images=False, progress=False)
    return StreamSource("v", resolve_shards(report.urls, "v", need_counts=True))


def packed_loader(tmp_path, src, workers=2, window=12, seed=0, mode="resampled", batch_size=1):
    tokenizer = build_tokenizer(TokenizerConfig(kind="words", path=str(words(tmp_path)), max_length=6))
    packing = Packing(P, 4, 24, row_tokens=32, rows=2, window=window, crop_scale=(0.7, 1.0), crop_ratio=(0.5, 2.0))
    stream = ShardStream(
        [src],
        process=NativeImageCaptionProcessor(NativeResizeFlip(P, 0.5), decode_image_tensor),
        collate=PackedCollator(tokenizer, P, 32),
        batch_size=batch_size,
        mode=mode,
        num_workers=workers,
        seed=seed,
        shuffle_buffer=5,
        packing=packing,
    )
    stream.segment = 10  # windows straddle segment boundaries
    return EpochAwareLoader(stream, num_workers=workers, gather=lambda table: table[None])


def words(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("sample\n" + "\n".join(str(i) for i in range(100)) + "\n")
    return path


def take(loader, k, state=None):
    if state is not None:
        loader.load_position_state(state)
    out = []
    for batch in loader:
        loader.mark_consumed(batch["stream_pos"])
        out.append(batch)
        if len(out) == k:
            return out


def fingerprint(batch):
    return batch["keys"], batch["patches"].sum().item(), batch["layout"]["patch_image"].tolist(), int(batch["skipped"])


def test_packed_batches_hold_their_window_once_within_the_token_budget(tmp_path):
    src = varied_shards(tmp_path, 24)
    batches = take(packed_loader(tmp_path, src, workers=0, window=24), 6)
    for batch in batches:
        rows = batch["layout"]["patch_image"]
        assert rows.shape[0] <= 2 and rows.shape[1] == 32  # rows x row_tokens: the batch's token budget
        assert batch["patches"].dtype == torch.uint8 and batch["patches"].shape == (rows.shape[0], 32, P * P * 3)
        assert len(batch["keys"]) == batch["tokens"].shape[0] == len(batch["grids"])
        for i, count in enumerate(gh * gw for gh, gw in batch["grids"]):
            assert 4 <= count <= 24 and (rows == i).sum() == count
    window = []
    for b in batches:  # the first window (24 samples) is emitted whole before the next one starts
        window += b["keys"]
        if len(window) >= 24:
            break
    # ... each of its draws exactly once: the same multiset as the stream's first 24 raw samples
    # (resampled mode draws shards with replacement, so a key may come twice, as drawn).
    assert sorted(window) == sorted(first_raw_keys(src, 24))


def test_a_packed_stream_continues_exactly_after_any_batch(tmp_path):
    src = varied_shards(tmp_path, 40, corrupt={3, 22})
    full = [fingerprint(b) for b in take(packed_loader(tmp_path, src), 14)]
    for k in (1, 2, 5, 9):  # inside windows and at their ends, on both workers
        cut = packed_loader(tmp_path, src)
        head = [fingerprint(b) for b in take(cut, k)]
        rest = [fingerprint(b) for b in take(packed_loader(tmp_path, src), 14 - k, cut.position_state())]
        assert head + rest == full, f"cut after {k} batches: the packed stream does not continue exactly"


def first_raw_keys(src, n):
    """The first n samples the resampled stream draws (packing or not, the draws are the same)."""
    plain = ShardStream(
        [src],
        process=lambda sample: sample["__key__"],
        collate=lambda keys: {"keys": keys},
        batch_size=n,
        mode="resampled",
        shuffle_buffer=5,
    )
    plain.segment = 10
    return next(iter(plain))["keys"]


def test_corrupt_samples_are_skipped_and_counted_once(tmp_path):
    src = varied_shards(tmp_path, 24, corrupt={2, 7, 15})
    drawn = first_raw_keys(src, 24)
    corrupt = sum(k in ("s0002", "s0007", "s0015") for k in drawn)
    assert corrupt > 0
    batches = take(packed_loader(tmp_path, src, workers=0, window=24), 20)
    first_window, seen = [], 0
    for b in batches:
        first_window.append(b)
        seen += len(b["keys"])
        if seen >= 24 - corrupt:
            break
    assert seen == 24 - corrupt and sum(int(b["skipped"]) for b in first_window) == corrupt
    assert not {"s0002", "s0007", "s0015"} & {k for b in first_window for k in b["keys"]}


def epochs(loader, count=2) -> list[list]:
    """Fingerprints of every batch of `count` epochs, each consumed."""
    out = []
    for _ in range(count):
        got = []
        for batch in loader:
            loader.mark_consumed(batch["stream_pos"])
            got.append(fingerprint(batch))
        out.append(got)
    return out


def test_a_packed_epoch_holds_each_sample_once_and_continues_exactly(tmp_path):
    """Epoch mode: batch_size images per batch in as many rows as they need (steps planned from counts)."""
    src = varied_shards(tmp_path, 40, corrupt={5})  # 5 shards of 9 / 4 over 2 workers
    loader = packed_loader(tmp_path, src, mode="epoch", batch_size=4)
    per_epoch = len(loader)
    full = epochs(loader)
    assert len(full[0]) == per_epoch == len(full[1])
    keys = [k for keys, *_ in full[0] for k in keys]
    assert len(keys) == len(set(keys)) and "s0005" not in keys  # once each, the corrupt one skipped
    assert sum(len(keys) for keys, *_ in full[0]) + sum(skip for *_, skip in full[0]) == per_epoch * 4
    for k in (1, per_epoch // 2, per_epoch - 1):
        cut = packed_loader(tmp_path, src, mode="epoch", batch_size=4)
        head = [fingerprint(b) for b in take(cut, k)]
        rest = packed_loader(tmp_path, src, mode="epoch", batch_size=4)
        rest.load_position_state(cut.position_state())
        tail = epochs(rest)
        assert head + tail[0] == full[0] and tail[1] == full[1], f"cut after {k} batches"


def test_a_window_without_a_usable_sample_counts_its_corrupt_ones_in_the_next_batch(tmp_path):
    """A window whose every sample is corrupt yields no batch; its skips go with the next batch the stream
    yields (they were lost, and data/skipped_samples undercounted)."""
    src = varied_shards(tmp_path, 9, corrupt={0, 1, 2})
    stream = packed_loader(tmp_path, src, workers=0, window=3).dataset
    raw = [s for s in wds.tarfile_to_samples()([{"url": src.shards.url(0)}])]  # in tar order: 3 corrupt first
    tagged = iter([(sample, (0, i + 1, (0, 0))) for i, sample in enumerate(raw)])
    batches = list(stream._packed_batches(tagged, 0, 0, 0, 0))
    assert batches and int(batches[0]["skipped"]) == 3 and sum(int(b["skipped"]) for b in batches) == 3
    assert sum(len(b["keys"]) for b in batches) == 6
