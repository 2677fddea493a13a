"""The shard manifest: one `manifest.json` per shard directory that says, for every shard, its name,
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aimv2.data.samples import IMAGE_EXTS
from aimv2.errors import UserError
from aimv2.fileio import atomic_write

log = logging.getLogger(__name__)
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
