"""Shard lists: brace expansion, and each shard's sample count and byte size.

At a recipe's scale a source is hundreds of thousands of shards, so nothing here touches a file per
shard when it can be avoided: counts and sizes come from the directory's manifest
(aimv2.data.shardlist: one read per shard directory). Shards a manifest does not list are described
one by one (their `NNNNN_stats.json`, else their tar listed), with a warning that names the command
that writes a manifest. In a multi-process run one process resolves and broadcasts the result
(aimv2.engine.stream_resume), so the other ranks open no metadata file at all.

A table is columns (urls, counts, sizes), O(shards) and cheap to pickle into every data worker.

The shard manifest: one `manifest.json` per shard directory that says, for every shard, its name,
sample count and byte size, so that a run learns its data's layout from one file instead of one
metadata operation per shard (350,000 shards x 256 ranks would be 90M file operations on a shared
filesystem at every start and requeue).

`aimv2 shards` writes it with its shards (last, so its presence means the directory is complete);
`aimv2 shards index DIR` writes it for a directory written by another tool (img2dataset's
`NNNNN.tar` + `NNNNN_stats.json`), reading each stats file once, in parallel.

Format (version 1): {"version": 1, "shards": [{"name": "00000.tar", "count": N, "bytes": B, "head": H}, ...],
"total": samples, "urls": brace pattern, "skipped": inputs the writer skipped (absent for an index)}.
`head` is a digest of the tar's first 4 KiB (its first member's header and bytes): with the name, size
and count it is the shard's identity, which a resumed epoch checks (aimv2.data.loader), so that a shard
rewritten with other samples of the same size is noticed, while a copy of the directory elsewhere is
the same data. A manifest written before version 1 has neither: sizes unknown (-1), heads empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np

from aimv2.data.readers import REMOTE_PREFIXES, local_path
from aimv2.data.samples import IMAGE_EXTS
from aimv2.errors import UserError
from aimv2.fileio import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int  # samples, -1 when unknown (remote shard, or resampled mode without a manifest)
    size: int = -1  # bytes, -1 when unknown
    head: str = ""  # digest of the tar's first 4 KiB (aimv2.data.shardlist), "" when unknown


class ShardTable:
    """The shards of one source as columns; iterating gives ShardInfo rows. A url is kept as its
    directory (one string per directory) and its file name (in one bytes array), so 350,000 shards are a
    few MB that pickle into each data worker as a few buffers, not 350,000 string objects."""

    def __init__(self, urls: Sequence[str], counts, sizes=None, heads: Sequence[str] | None = None):
        n = len(urls)
        dirs: dict[str, int] = {}
        self._dir_of = np.empty(n, dtype=np.int32)
        names = []
        for i, url in enumerate(urls):
            head, slash, name = url.rpartition("/")
            self._dir_of[i] = dirs.setdefault(head + slash, len(dirs))
            names.append(name.encode())
        self._dirs = list(dirs)
        self._names = np.array(names, dtype=bytes) if names else np.zeros(0, dtype="S1")
        self.counts = np.asarray(counts, dtype=np.int64).reshape(n)
        self.sizes = np.full(n, -1, dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64).reshape(n)
        # the hex digests as integers (0: unknown): 8 bytes a shard instead of a string object
        self.heads = np.array(
            [int(h, 16) if h else 0 for h in heads] if heads is not None else np.zeros(n), dtype=np.uint64
        ).reshape(n)
        self._digests: np.ndarray | None = None

    @classmethod
    def of(cls, infos: Sequence[ShardInfo]) -> ShardTable:
        return cls([i.url for i in infos], [i.count for i in infos], [i.size for i in infos], [i.head for i in infos])

    @classmethod
    def concat(cls, tables: Sequence[ShardTable]) -> ShardTable:
        """One table of several, in order (a stream's shards over all its sources)."""
        out = cls([], [])
        out._dirs = [d for t in tables for d in t._dirs]
        offsets = np.cumsum([0] + [len(t._dirs) for t in tables[:-1]]) if tables else []
        out._dir_of = np.concatenate([t._dir_of + o for t, o in zip(tables, offsets)] or [out._dir_of])
        out._names = np.concatenate([t._names for t in tables] or [out._names])
        for column in ("counts", "sizes", "heads"):
            setattr(out, column, np.concatenate([getattr(t, column) for t in tables] or [getattr(out, column)]))
        if tables and all(t._digests is not None for t in tables):
            out._digests = np.concatenate([t._digests for t in tables])
        return out

    def url(self, i: int) -> str:
        return self._dirs[self._dir_of[i]] + self._names[i].decode()

    @property
    def urls(self) -> _Urls:
        """The urls as a read-only sequence (built one at a time)."""
        return _Urls(self)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: int) -> ShardInfo:
        head = int(self.heads[i])
        return ShardInfo(self.url(i), int(self.counts[i]), int(self.sizes[i]), f"{head:016x}" if head else "")

    def __iter__(self) -> Iterator[ShardInfo]:
        return (self[i] for i in range(len(self)))

    def digests(self) -> np.ndarray:
        """(n,) uint64 per shard: its identity, the file name, byte size, sample count and head digest
        (not the directory: a requeued job may see the same shards elsewhere). Computed once (about a
        second for 350,000 shards)."""
        if self._digests is None:
            out = np.empty(len(self), dtype=np.uint64)
            rows = zip(self._names.tolist(), self.sizes.tolist(), self.counts.tolist(), self.heads.tolist())
            for i, (name, size, count, head) in enumerate(rows):
                text = name + f"\0{size}\0{count}\0{head}".encode()
                out[i] = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
            self._digests = out
        return self._digests


class _Urls(Sequence):
    def __init__(self, table: ShardTable):
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._table.url(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._table.url(i)


def expand_urls(spec: str, key: str, check_exists: bool = True) -> list[str]:
    """'/d/{000..002}.tar::/e/x.tar' -> the list of shard urls; with `check_exists` every local one
    must exist (one file operation per shard: for tools, not for every rank of a run)."""
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part.strip()) if u]
    if not urls:
        raise UserError(f"{key}: no shards in {spec!r}")
    for url in urls if check_exists else ():
        if not _local(url).is_file():
            raise UserError(f"{key}: shard not found: {url}")
    return urls


def check_first_shard(spec: str, key: str) -> None:
    """A cheap check before anything is built: the pattern expands and its first local shard exists
    (one file operation per source; a typo in a directory fails here)."""
    first = expand_urls(spec, key, check_exists=False)[0]
    if not first.startswith(REMOTE_PREFIXES) and not _local(first).is_file():
        raise UserError(f"{key}: shard not found: {first}")


def shard_sample_count(url: str) -> int | None:
    """Samples in a local shard, from its sibling `<name>_stats.json`; None when unknown."""
    path = str(_local(url))
    if "://" in path or path.startswith("pipe:") or not path.endswith(".tar"):
        return None
    return stats_count(Path(path[: -len(".tar")] + "_stats.json"))


def resolve_shards(spec: str, key: str, need_counts: bool) -> ShardTable:
    """The shards of `spec` with their counts and sizes: from the manifests of their directories
    (one read each); a shard no manifest lists is described alone (stats file, else its tar listed)
    when `need_counts` (epoch mode), else left unknown (resampled mode draws shards by name; only
    the first is checked to exist, a missing one later is a counted shard error)."""
    urls = expand_urls(spec, key, check_exists=False)
    manifests: dict[str, dict | None] = {}
    counts, sizes, heads, missing = [-1] * len(urls), [-1] * len(urls), [""] * len(urls), []
    for i, url in enumerate(urls):
        if url.startswith(REMOTE_PREFIXES):
            if need_counts:
                raise UserError(
                    f"{key}: the sample counts of remote shard {url} are unknown (no local manifest); "
                    "epoch mode and the held-out set need them"
                )
            continue
        local = local_path(url)
        directory, _, name = local.rpartition("/") if "/" in local else (".", "", local)
        if directory not in manifests:
            manifests[directory] = read_manifest(directory or "/")
        entry = (manifests[directory] or {}).get(name)
        if entry is not None:
            counts[i], sizes[i], heads[i] = entry.count, entry.size, entry.head
        else:
            missing.append(i)
    if missing and need_counts:
        log.warning(
            "%s: %d of %d shards are in no manifest.json: reading a stats file (or listing the tar) per "
            "shard; `aimv2 shards index DIR` writes a manifest, read once instead",
            key,
            len(missing),
            len(urls),
        )
        for i in missing:
            try:
                entry, listed = describe_shard(_local(urls[i]))
            except UserError as err:
                raise UserError(f"{key}: {err}") from None
            if listed:
                log.warning("no count manifest beside %s: listed the tar to count its samples", urls[i])
            counts[i], sizes[i], heads[i] = entry.count, entry.size, entry.head
    elif missing:
        check_first_shard(urls[missing[0]], key)
    return ShardTable(urls, counts, sizes, heads)


def _local(url: str) -> Path:
    return Path(local_path(url))


MANIFEST = "manifest.json"
VERSION = 1
HEAD_BYTES = 4096


@dataclass(frozen=True)
class ShardEntry:
    name: str
    count: int  # samples
    size: int  # bytes of the tar, -1 when unknown
    head: str = ""  # digest of its first HEAD_BYTES bytes, "" when unknown


def head_digest(path: str | Path) -> str:
    """A digest of a shard's first 4 KiB: one small read."""
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(HEAD_BYTES), digest_size=8).hexdigest()


def manifest_json(entries: list[ShardEntry], urls: str, skipped: int | None = None) -> str:
    doc = {
        "version": VERSION,
        "shards": [{"name": e.name, "count": e.count, "bytes": e.size, "head": e.head} for e in entries],
        "total": sum(e.count for e in entries),
        "urls": urls,
    }
    if skipped is not None:
        doc["skipped"] = skipped
    return json.dumps(doc, indent=1) + "\n"


def read_manifest(directory: str | Path) -> dict[str, ShardEntry] | None:
    """{shard file name: entry} from DIRECTORY/manifest.json, or None when there is none; a one-line
    UserError naming the file when it is unreadable or malformed."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"cannot read shard manifest {path}: {err.strerror or err}") from None
    try:
        doc = json.loads(text)
        return {
            s["name"]: ShardEntry(s["name"], int(s["count"]), int(s.get("bytes", -1)), str(s.get("head", "")))
            for s in doc["shards"]
        }
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"malformed shard manifest {path} ({type(err).__name__}: {err}); rewrite it with "
            f"`aimv2 shards index {path.parent}`"
        ) from None


def stats_count(stats: Path) -> int | None:
    """Samples of a shard from its img2dataset-style `NNNNN_stats.json` ("successes": img2dataset's "count"
    includes the failed downloads, which are not in the tar); None when there is no such file."""
    try:
        data = json.loads(stats.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"unreadable shard stats file {stats}: {type(err).__name__}: {err}") from None
    for name in ("successes", "count"):
        value = data.get(name) if isinstance(data, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def count_tar_samples(path: str | Path) -> int:
    """Samples in a tar = distinct keys that have an image member (the whole tar is read)."""
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            stem, _, ext = member.name.rpartition("/")[2].partition(".")
            if ext.lower() in IMAGE_EXTS:
                keys.add(stem)
    return len(keys)


def describe_shard(path: Path) -> tuple[ShardEntry, bool]:
    """(entry, counted from the tar) for one local shard: its stats file's count, else its tar listed."""
    try:
        size, head = path.stat().st_size, head_digest(path)
    except FileNotFoundError:
        raise UserError(f"shard not found: {path}") from None
    except OSError as err:
        raise UserError(f"cannot read shard {path}: {err.strerror or err}") from None
    count = stats_count(path.with_name(f"{path.stem}_stats.json"))
    if count is not None:
        return ShardEntry(path.name, count, size, head), False
    try:
        return ShardEntry(path.name, count_tar_samples(path), size, head), True
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"cannot read shard {path}: {err}") from None


@dataclass
class Index:
    path: Path  # the manifest written
    entries: list[ShardEntry]
    listed: int  # shards without a stats file, counted by listing their tar
    urls: str  # the shards as a config's data.sources[].urls


def index_directory(directory: str | Path, threads: int = 16) -> Index:
    """Write DIRECTORY/manifest.json for the `*.tar` shards in it (sorted by name)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"not a directory: {directory}")
    tars = sorted(Path(e.path) for e in os.scandir(directory) if e.name.endswith(".tar") and not e.name.startswith("."))
    if not tars:
        raise UserError(f"no .tar shards in {directory}")
    with ThreadPoolExecutor(max(1, threads)) as pool:  # I/O bound: stat + one small read per shard
        described = list(pool.map(describe_shard, tars))
    entries = [entry for entry, _ in described]
    counted = sum(listed for _, listed in described)
    urls = f"{directory.resolve()}/{tars[0].name}" if len(tars) == 1 else _pattern(directory.resolve(), tars)
    path = directory / MANIFEST
    atomic_write(path, manifest_json(entries, urls))
    return Index(path, entries, counted, urls)


def _pattern(directory: Path, tars: list[Path]) -> str:
    """A brace pattern when the names are consecutive zero-padded numbers, else '::'-joined paths."""
    stems = [t.stem for t in tars]
    width = len(stems[0])
    if all(s.isdigit() and len(s) == width for s in stems) and [int(s) for s in stems] == list(
        range(int(stems[0]), int(stems[0]) + len(stems))
    ):
        return f"{directory}/{{{stems[0]}..{stems[-1]}}}.tar"
    return "::".join(str(directory / t.name) for t in tars)
