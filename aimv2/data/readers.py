"""Resumable raw-sample readers: where a stream is can be written down as a few integers.

WebDataset has no mid-epoch resume: a tar is read from its start. These readers make the position
in the raw sample sequence explicit, so a restarted worker can re-open the right shard and skip the
samples it had already read (reading tar members, never decoding them):

- `ShardSequence`: ranges of shards read in a fixed order (epoch mode); position (range index,
  samples of its shard read, samples of it counted).
- `ResampledShards`: an endless stream of one source, each shard drawn with replacement from a seed
  and the draw's index; position (draw index, offset in that shard).

`read_tar` is how both open a shard: webdataset's tar reader, after checking the shard's byte size
against its manifest's (its identity: aimv2.data.shardlist).

A reader's `pos` is the continuation point after the last sample it yielded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterator

import webdataset as wds

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")  # shards read as streams, no seek

MAX_EMPTY_DRAWS = 100  # consecutive resampled shards without one sample before a source is declared dead


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts: the same on every machine and Python run (unlike hash())."""
    digest = hashlib.blake2b("-".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def local_path(url: str) -> str:
    """The file path of a local shard url (`file:` dropped)."""
    return url[len("file:") :] if url.startswith("file:") else url


def read_tar(url: str, on_error: Callable[[Exception], bool], size: int = -1) -> Iterator[dict]:
    """The samples of shard `url` (webdataset's reader; `on_error` decides about unreadable data). With
    `size` (its manifest's byte size) a local shard of another size is skipped whole, through `on_error`:
    a shard replaced after its manifest was written holds other samples than an epoch's ids say. The
    stat is of a file about to be opened anyway."""
    if size >= 0 and not url.startswith(REMOTE_PREFIXES):
        try:
            actual = os.stat(local_path(url)).st_size
        except OSError:
            actual = size  # a missing file is reported by the reader below, as any unreadable shard
        if actual != size:
            on_error(
                ValueError(
                    f"shard {url} is {actual} bytes, but its manifest says {size}: it changed after the "
                    "manifest was written; skipped (rewrite the manifest: aimv2 shards index DIR)"
                )
            )
            return iter(())
    return wds.tarfile_to_samples(handler=on_error)([{"url": url}])


class ShardSequence:
    """Samples of ranges of shards, `units` = [(url, first, end), ...], read in that order, each tagged
    with its index in its shard (`__index__`). `done(url, j)` passes over samples an earlier part of the
    epoch consumed; first and end count the samples it leaves. Position: (unit, samples of the unit's
    shard read, samples of it counted), so a restart skips what was read without decoding."""

    width = 3

    def __init__(
        self,
        units: list[tuple[str, int, int]],
        read: Callable[[str], Iterator[dict]],
        pos: tuple[int, ...] = (0, 0, 0),
        done: Callable[[str, int], bool] | None = None,
    ):
        self.units, self.read, self.done = units, read, done
        self.pos = tuple(pos)

    def __iter__(self) -> Iterator[dict]:
        unit, offset, counted = self.pos
        for u in range(unit, len(self.units)):
            url, first, end = self.units[u]
            if counted < end:
                for j, sample in enumerate(self.read(url)):
                    if j < offset:
                        continue  # already read before the restart: skipped without decoding
                    if self.done is None or not self.done(url, j):
                        k, counted = counted, counted + 1
                        if k >= first:
                            self.pos = (u, j + 1, counted)
                            sample["__index__"] = j
                            yield sample
                    self.pos = (u, j + 1, counted)
                    if counted >= end:
                        break  # the rest of the shard belongs to other slots
            offset, counted = 0, 0
            self.pos = (u + 1, 0, 0)


class ResampledShards:
    """Endless samples of one source: draw d reads shard urls[Random(key, d).randrange(n)]."""

    width = 2

    def __init__(self, urls: list[str], read: Callable[[str], Iterator[dict]], key: str, pos: tuple[int, ...] = (0, 0)):
        self.urls, self.read, self.key = urls, read, key
        self.pos = tuple(pos)

    def shard_of(self, draw: int) -> str:
        return self.urls[random.Random(stable_seed(self.key, draw)).randrange(len(self.urls))]

    def __iter__(self) -> Iterator[dict]:
        draw, offset = self.pos
        empty = 0
        while True:
            got = False
            for j, sample in enumerate(self.read(self.shard_of(draw))):
                if j < offset:
                    continue
                got = True
                self.pos = (draw, j + 1)
                yield sample
            empty = 0 if got or offset else empty + 1
            if empty >= MAX_EMPTY_DRAWS:
                raise RuntimeError(
                    f"{MAX_EMPTY_DRAWS} shards in a row without a readable sample, e.g. {self.shard_of(draw)}"
                )
            draw, offset = draw + 1, 0
            self.pos = (draw, 0)


class Mixture:
    """Several resamplers mixed per sample by weight; the choices come from the caller's rng."""

    def __init__(self, readers: list[ResampledShards], weights: list[float]):
        self.readers, self.weights = readers, weights
        self._iters = [iter(r) for r in readers]
        self.width = sum(r.width for r in readers)

    @property
    def pos(self) -> tuple[int, ...]:
        return tuple(v for r in self.readers for v in r.pos)

    def take(self, rng: random.Random, n: int) -> Iterator[dict]:
        choices = range(len(self._iters))
        for _ in range(n):
            yield next(self._iters[rng.choices(choices, self.weights)[0]])


def split_positions(flat: tuple[int, ...], widths: list[int]) -> list[tuple[int, ...]]:
    """The inverse of concatenating reader positions."""
    out, i = [], 0
    for w in widths:
        out.append(tuple(flat[i : i + w]))
        i += w
    return out
