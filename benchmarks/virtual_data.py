"""The virtual data set of benchmarks/scale.py: the L recipe's five sources at a chosen size, as real
manifest files naming shards that do not exist, a stand-in file system that answers for those shards and
counts every operation on them, and the positions a healthy epoch's stream reaches after K batches
(tests/test_scale.py checks them against the real stream reading virtual tars)."""

from __future__ import annotations

import builtins
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aimv2.config.schema import DataConfig, SourceConfig, TokenizerConfig
from aimv2.data.epoch_plan import slot_read_order
from aimv2.data.readers import ShardSequence
from aimv2.data.shardlist import ShardEntry, manifest_json
from aimv2.data.stream import ShardStream


@dataclass
class Size:
    shards: list[int]  # per source (the L recipe's five: DFN-2B alt, DFN-2B synthetic, COYO, HQITP x 2)
    per_shard: tuple[int, int]  # sample counts drawn in [lo, hi]
    world: int
    workers: int
    batch: int
    shuffle_buffer: int
    resumes: tuple[int, ...]  # ranks of the resumed layouts
    held_out: int  # samples of the validation set
    at: float = 0.4  # the checkpoint's place in the epoch
    resampled_steps: int = 1_464_844  # 12B samples at global batch 8,192
    weights: list[float] = field(default_factory=lambda: [0.30, 0.30, 0.09, 0.28, 0.03])


SIZES = {
    "recipe": Size([100_000, 100_000, 70_000, 40_000, 40_000], (9_990, 10_000), 256, 8, 32, 2000, (128, 384), 10_000),
    "small": Size([40, 40, 28, 16, 16], (90, 100), 8, 2, 4, 50, (4, 12), 400),
}


# -- the stand-in file system ----------------------------------------------------------------
class Operations:
    """File operations on the virtual shards' directories, counted by kind; the shards and their stats
    files exist only here, the manifests are real files (read for real, and counted)."""

    def __init__(self, root: Path, counts: dict[str, int], sizes: dict[str, int]):
        self.root, self.counts, self.sizes = str(root), counts, sizes
        self.ops: dict[str, int] = {}

    def _count(self, kind: str) -> None:
        self.ops[kind] = self.ops.get(kind, 0) + 1

    @contextmanager
    def installed(self):
        fs = self
        real = {"is_file": Path.is_file, "stat": Path.stat, "read_text": Path.read_text, "open": builtins.open}

        def is_file(path):
            if str(path).startswith(fs.root):
                fs._count("stat")
                return str(path).endswith(".json") and real["is_file"](path) or str(path) in fs.sizes
            return real["is_file"](path)

        def stat(path, *a, **k):
            if str(path) in fs.sizes:
                fs._count("stat")
                return os.stat_result((0o100644, 0, 0, 1, 0, 0, fs.sizes[str(path)], 0, 0, 0))
            return real["stat"](path, *a, **k)

        def read_text(path, *a, **k):
            name = str(path)
            if name.startswith(fs.root):
                fs._count("open")
                if name.endswith("_stats.json"):
                    shard = name[: -len("_stats.json")] + ".tar"
                    return json.dumps({"successes": fs.counts[shard], "count": fs.counts[shard]})
            return real["read_text"](path, *a, **k)

        def open_(file, mode="r", *a, **k):
            if isinstance(file, (str, Path)) and str(file) in fs.sizes:
                fs._count("open")
                return io.BytesIO(str(file).encode())  # a shard's first bytes: its name stands in for them
            return real["open"](file, mode, *a, **k)

        Path.is_file, Path.stat, Path.read_text, builtins.open = is_file, stat, read_text, open_
        try:
            yield self
        finally:
            Path.is_file, Path.stat, Path.read_text, builtins.open = (
                real["is_file"],
                real["stat"],
                real["read_text"],
                real["open"],
            )


def virtual_set(root: Path, size: Size, scale: int = 1, manifests: bool = True) -> tuple[DataConfig, Operations]:
    """The sources' directories under `root` (a manifest each, when `manifests`), and a DataConfig that
    names them as the recipe's config does; `scale` multiplies every shard's sample count."""
    rng = np.random.default_rng(0)
    counts, sizes, sources = {}, {}, []
    for s, n in enumerate(size.shards):
        directory = root / f"source{s}"
        directory.mkdir(parents=True, exist_ok=True)
        names = [f"{i:06d}.tar" for i in range(n)]
        per = rng.integers(size.per_shard[0], size.per_shard[1] + 1, n) * scale
        entries = [
            ShardEntry(name, int(c), int(c) * 60_000, f"{(s << 40) + i:016x}")
            for i, (name, c) in enumerate(zip(names, per))
        ]
        for e in entries:
            counts[str(directory / e.name)], sizes[str(directory / e.name)] = e.count, e.size
        urls = f"{directory}/{{{names[0][:-4]}..{names[-1][:-4]}}}.tar"
        manifest = directory / "manifest.json"
        if manifests:
            manifest.write_text(manifest_json(entries, urls))
        elif manifest.exists():
            manifest.unlink()
        sources.append(SourceConfig(urls=urls, weight=size.weights[s], name=f"source{s}"))
    words = root.parent / "words.txt"  # the tokenizer's file: not a shard directory's
    words.write_text("a\nb\n")
    cfg = DataConfig(
        sources=sources,
        mode="epoch",
        batch_size=size.batch,
        num_workers=size.workers,
        shuffle_buffer=size.shuffle_buffer,
        tokenizer=TokenizerConfig(kind="words", path=str(words)),
    )
    return cfg, Operations(root, counts, sizes)


def key_of(sample: dict) -> str:
    return sample["__key__"]


def keys_of(items: list) -> dict:
    return {"keys": list(items)}


def stream_for(sources, size: Size, world: int, rank: int = 0, mode: str = "epoch") -> ShardStream:
    return ShardStream(
        sources,
        process=key_of,
        collate=keys_of,
        batch_size=size.batch,
        mode=mode,
        rank=rank,
        world_size=world,
        num_workers=size.workers,
        seed=0,
        shuffle_buffer=size.shuffle_buffer,
    )


def epoch_position(stream: ShardStream, plan, slot: int, produced: int) -> tuple[int, ...]:
    """Where slot `slot` stands after `produced` full batches of a healthy epoch (no corrupt sample: batch k
    ends at raw sample (k + 1) x batch): (pass, segment, taken, produced, unit, offset, counted), the
    reader position being the one at the segment's start (aimv2.data.readers.ShardSequence)."""
    raw = produced * stream.batch_size
    if raw == 0:
        return (0,) * (4 + ShardSequence.width)
    seg = (raw - 1) // stream.segment
    start = seg * stream.segment  # samples read before the segment
    units = stream_units(stream, plan, slot)
    sizes = np.array([end - first for _, first, end in units])
    ends = np.cumsum(sizes)
    if start == 0:
        reader = (0, 0, 0)
    else:
        u = int(np.searchsorted(ends, start, side="left"))  # the unit holding sample number `start`
        first = units[u][1]
        done = start - int(ends[u] - sizes[u])
        reader = (u, first + done, first + done)
    return (0, seg, raw - start, produced, *reader)


def stream_units(stream: ShardStream, plan, slot: int):
    return slot_read_order(plan, slot, stream.seed, stream.gen, stream.epoch, 0)
