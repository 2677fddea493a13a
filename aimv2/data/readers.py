"""Resumable raw-sample readers: where a stream is can be written down as a few integers.

WebDataset has no mid-epoch resume: a tar is read from its start. These readers make the position
in the raw sample sequence explicit, so a restarted worker can re-open the right shard and skip the
samples it had already read (reading tar members, never decoding them):

- `ShardSequence`: shards read in a fixed order (epoch mode); position (shard index, offset in
  that shard, samples seen over the whole sequence), the last one drives the sample split.
- `Resampler`: an endless stream of one source, each shard drawn with replacement from a seed
  and the draw's index; position (draw index, offset in that shard).

A reader's `pos` is the continuation point after the last sample it yielded.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Iterator, Optional

MAX_EMPTY_DRAWS = 100  # consecutive resampled shards without one sample before a source is declared dead


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts: the same on every machine and Python run (unlike hash())."""
    digest = hashlib.blake2b("-".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ShardSequence:
    """Samples of `urls` in order; with `keep`, only samples whose running index it accepts."""

    width = 3

    def __init__(self, urls: list[str], read: Callable[[str], Iterator[dict]],
                 keep: Optional[Callable[[int], bool]] = None, pos: tuple[int, ...] = (0, 0, 0)):
        self.urls, self.read, self.keep = urls, read, keep
        self.pos = tuple(pos)

    def __iter__(self) -> Iterator[dict]:
        shard, offset, index = self.pos
        for s in range(shard, len(self.urls)):
            for j, sample in enumerate(self.read(self.urls[s])):
                if j < offset:
                    continue  # already read before the restart: skipped without decoding
                i, index = index, index + 1
                self.pos = (s, j + 1, index)
                if self.keep is None or self.keep(i):
                    yield sample
            offset = 0
            self.pos = (s + 1, 0, index)


class Resampler:
    """Endless samples of one source: draw d reads shard urls[Random(key, d).randrange(n)]."""

    width = 2

    def __init__(self, urls: list[str], read: Callable[[str], Iterator[dict]], key: str,
                 pos: tuple[int, ...] = (0, 0)):
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
                raise RuntimeError(f"{MAX_EMPTY_DRAWS} shards in a row without a readable sample, e.g. "
                                   f"{self.shard_of(draw)}")
            draw, offset = draw + 1, 0
            self.pos = (draw, 0)


class Mixture:
    """Several resamplers mixed per sample by weight; the choices come from the caller's rng."""

    def __init__(self, readers: list[Resampler], weights: list[float]):
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
        out.append(tuple(flat[i:i + w]))
        i += w
    return out
