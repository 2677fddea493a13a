"""Reading ranges of tar shards from their first sample, not from the shard's start: the byte-level access
under the evaluation reader (aimv2.data.every_sample), whose slots read ranges that mostly start inside a
shard; read from each shard's start, every slot would pass over the samples before its range too.

Where a sample starts (the byte offset of its first member's header) is found by walking only the member
headers (`sample_starts`: tarfile on an unbuffered file seeks past the data, so it reads a header's 512
bytes per member), once per run, each shard by one rank (`index_ranges`). A tar stream starting at a header
is a tar stream: webdataset's own iteration and key grouping read it, so every sample is the one a read
from the shard's start gives (keys, `__url__`, fields). Remote shards (pipe:, http(s), s3, ...) cannot
seek: they are read from their start, as are local shards that cannot be indexed (compressed, truncated
before a range, a global pax header, or a sample key that comes back after another key), said once.
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from itertools import count

import webdataset as wds

from aimv2.data.shardlist import REMOTE_PREFIXES

log = logging.getLogger(__name__)
Range = tuple[str, int, int | None]  # (shard url, first sample, end): samples first..end-1; end None: to its end
Start = tuple[int, str]  # where a sample starts in its shard: (byte offset of its first member's header, its key)
Index = dict[str, dict[int, Start]]  # shard url -> {sample number: its start}

_META = re.compile(r"__[^/]*__($|/)")  # member names webdataset's tar iteration skips (tar_file_iterator)


def is_remote(url: str) -> bool:
    """Whether a shard is read through a stream that cannot seek (pipe:, http(s), s3, ...)."""
    return url.startswith(REMOTE_PREFIXES)


def _read(url: str) -> Iterator[dict]:
    """The samples of a shard from its start, as webdataset reads them."""
    for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)([{"url": url}]):
        sample["__url__"] = url  # the shard a sample's fixed prefix length is seeded with
        yield sample


def _members(f, url: str) -> Iterator[dict]:
    """The files of the tar stream `f`, as webdataset's tar_file_expander gives them for one shard."""
    try:
        for member in wds.tariterators.tar_file_iterator(f, handler=wds.warn_and_continue):
            member["__url__"] = url
            yield member
    except Exception as err:  # noqa: BLE001 - as tar_file_expander: warn and end the shard
        if not wds.warn_and_continue(err):
            raise


def _read_from(url: str, offset: int) -> Iterator[dict]:
    """The samples of local shard `url` from the member header at byte `offset` on, as `_read` gives them:
    webdataset's tar iteration and key grouping over the file positioned there (a tar stream may start at
    any header)."""
    with open(url, "rb") as f:
        f.seek(offset)
        for sample in wds.tariterators.group_by_keys(_members(f, url), handler=wds.warn_and_continue):
            sample["__url__"] = url
            yield sample


class _CountingFile(io.FileIO):
    """An unbuffered file that counts the bytes read from it: a buffered one would read a whole buffer
    (8 KiB, or a parallel filesystem's block size: MiBs) around each 512-byte header."""

    bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


@dataclass
class ScanStats:
    """What indexing read: shards walked, member headers parsed, bytes read (a header is 512 bytes, plus
    the byte before it that tarfile reads to check that the data before it is there)."""

    shards: int = 0
    headers: int = 0
    bytes: int = 0


class ShardLayoutError(ValueError):
    """A local shard whose member headers do not locate its samples."""


def _member_key(info: tarfile.TarInfo) -> str | None:
    """The key webdataset groups member `info` under (tariterators.base_plus_ext); None for one it skips."""
    if not info.isreg() or _META.match(info.name):
        return None
    return wds.tariterators.base_plus_ext(info.name)[0]


def sample_starts(path: str, wanted: Iterable[int], stats: ScanStats | None = None) -> dict[int, Start]:
    """Where samples `wanted` of local shard `path` start: {j: (byte offset of its first member's header,
    its key)}, sample j being the j-th run of consecutive members with one key, as webdataset groups them
    (its first member's offset includes any pax or GNU long-name header before it). Reads only member
    headers, up to the last sample wanted (tarfile on an unbuffered file seeks past the data). Raises
    ShardLayoutError when the headers cannot locate them: a key that comes back after another key
    (members not grouped by sample), a global pax header (a stream started after it would miss it), fewer
    samples than wanted; tarfile.TarError for a shard that is not a plain tar (compressed) or is truncated."""
    wanted = set(wanted)
    found: dict[int, Start] = {}
    if not wanted:
        return found
    last, seen, group, key, headers = max(wanted), set(), -1, None, 0
    with _CountingFile(path) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
            while group < last:
                info = tar.next()
                if info is None:
                    break
                headers += 1
                tar.members = []  # nothing kept per member: memory stays flat on any shard
                name_key = _member_key(info)
                if name_key is None or name_key == key:
                    continue
                if name_key in seen:
                    raise ShardLayoutError(
                        f"the members of sample {name_key!r} are not consecutive (the tar is not grouped by sample key)"
                    )
                group, key = group + 1, name_key
                seen.add(key)
                if group in wanted:
                    found[group] = (info.offset, key)
            if tar.pax_headers:
                raise ShardLayoutError("a global pax header (a stream started after it would not apply it)")
        finally:
            if stats is not None:
                stats.shards += 1
                stats.headers += headers
                stats.bytes += f.bytes_read
    if group < last:
        raise ShardLayoutError(f"{group + 1} samples, sample {last} wanted")
    return found


def needed_starts(slots: list[list[Range]]) -> dict[str, list[int]]:
    """The local shards in which some range of `slots` starts after the first sample -> those first
    samples, sorted; shards in the order of the slots."""
    out: dict[str, set[int]] = {}
    for units in slots:
        for url, first, _ in units:
            if first > 0 and not is_remote(url):
                out.setdefault(url, set()).add(first)
    return {url: sorted(firsts) for url, firsts in out.items()}


def index_ranges(slots: list[list[Range]], rank: int = 0, world: int = 1, stats: ScanStats | None = None) -> Index:
    """Rank `rank`'s share of the index of `slots` (every slot of every rank): where the ranges that start
    inside a local shard start, for the shards dealt to it (the n-th such shard to rank n % world), so each
    shard is walked once in all. A shard that cannot be indexed is left out, with a warning naming it: its
    slots read it from its start, which gives the same samples."""
    index: Index = {}
    for n, (url, firsts) in enumerate(needed_starts(slots).items()):
        if n % world != rank:
            continue
        try:
            index[url] = sample_starts(url, firsts, stats)
        except Exception as err:  # noqa: BLE001 - any: a rank must not fail alone before a collective
            reason = str(err) if isinstance(err, ShardLayoutError) else f"{type(err).__name__}: {err}"
            log.warning(
                "held-out shard %s: cannot locate its samples by its headers (%s); its slots read it from its start",
                url,
                " ".join(reason.split()),
            )
    return index


def slot_starts(slots: list[list[Range]], index: Index) -> dict[tuple[str, int], Start]:
    """The starts of the ranges of `slots` that `index` knows, by (shard url, first sample)."""
    return {
        (url, first): index[url][first] for units in slots for url, first, _ in units if first in index.get(url, {})
    }


def read_ranges(units: list[Range], starts: Mapping[tuple[str, int], Start]) -> Iterator[tuple[int, dict]]:
    """The samples of ranges `units` in order, each exactly as a read of its shard from the start gives it
    (plus "__index__": its number in its shard), with the tar samples passed over to reach it: 1, plus the
    ones before its range when that is read from its shard's start (no entry in `starts`: a remote shard,
    one not indexed; or a shard that changed since it was indexed, said in a warning)."""
    for url, first, end in units:
        passed, start = 0, starts.get((url, first))
        if start is not None:
            with closing(_read_from(url, start[0])) as samples:
                head = next(samples, None)
                passed += head is not None
                if head is not None and head["__key__"] == start[1]:
                    head["__index__"] = first
                    yield 1, head
                    rest = count(first + 1) if end is None else range(first + 1, end)
                    for j, sample in zip(rest, samples):  # zip stops before reading past end
                        sample["__index__"] = j
                        yield 1, sample
                    continue
            log.warning(
                "held-out shard %s changed since it was indexed (its sample %d is not %r): read from its start",
                url,
                first,
                start[1],
            )
        with closing(_read(url)) as samples:
            for j, sample in enumerate(samples):
                passed += 1
                if j >= first:
                    sample["__index__"] = j
                    yield passed, sample
                    passed = 0
                if end is not None and j + 1 >= end:
                    break  # the rest of the shard belongs to other slots
