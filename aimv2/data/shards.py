"""The shard writer: image files plus captions or class labels -> WebDataset tar shards.

Why a fixed layout: the streaming pipeline reads our shards and img2dataset's with the same
code, so we follow img2dataset's webdataset output (`00000.tar` + `00000_stats.json`, members
`<key>.jpg`, `<key>.txt`, `<key>.json`). Why atomic writes: a training job that globs or
brace-expands a directory must never read a truncated shard, so every file appears under its
final name only once complete (temp name in the same directory, then a rename: aimv2.fileio).

Inputs that cannot be used (missing file, undecodable image, empty caption) are not errors:
they are skipped and listed in the `WriteReport`, because one bad file in a million must not
stop a run. Mistakes in what the user told us (a malformed captions file, an empty class
directory, an output directory that already holds shards) are `UserError`s.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import webdataset
from PIL import Image

from aimv2.data.samples import IMAGE_EXTS, CorruptSample, image_header_size
from aimv2.data.shardlist import MANIFEST, ShardEntry, head_digest, manifest_json
from aimv2.errors import UserError, one_line
from aimv2.fileio import atomic_write, publish_file
from aimv2.progress import progress as progress_bar

_CANONICAL_EXT = {"jpeg": "jpg"}  # one name per format: fewer variants for readers to match
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots: webdataset splits key from field at one
# Files this writer owns in an output directory (removed on overwrite so no stale shard stays).
_OWNED_RE = re.compile(r"^(\d{5,}\.tar|\d{5,}_stats\.json|manifest\.json|classes\.json)$")
_TEMP_RE = re.compile(r"^\.(\d{5,}\.tar|\d{5,}_stats\.json|manifest\.json|classes\.json)\.tmp$")


@dataclass
class ShardSample:
    """One sample to write. A reader that could not load an input sets `error` (and leaves
    `image` empty) so the writer records the skip instead of the reader raising mid-run."""

    key: str
    image: bytes
    image_ext: str
    caption: str | None = None
    cls: int | None = None
    source: str = ""
    error: str | None = None


@dataclass
class WriteReport:
    """What `write_shards` wrote, and which inputs it skipped and why."""

    out_dir: Path
    shards: list[Path] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    urls: str = ""

    def summary(self, max_skipped: int = 5) -> str:
        """A few human lines: where the shards went, the config pattern, the first skips."""
        if self.total:
            lines = [
                f"wrote {self.total} samples in {len(self.shards)} shards to {self.out_dir}",
                f'config, under data.sources:  - urls: "{self.urls}"',
            ]
        else:
            lines = [f"wrote no samples to {self.out_dir}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} inputs:")
            lines += [f"  {where}: {why}" for where, why in self.skipped[:max_skipped]]
            if len(self.skipped) > max_skipped:
                lines.append(f"  ... and {len(self.skipped) - max_skipped} more")
        return "\n".join(lines)


def image_ext(path: str | Path) -> str | None:
    """The canonical image extension of a file name (`jpeg` -> `jpg`), or None if unsupported."""
    ext = Path(path).suffix.lower().lstrip(".")
    return _CANONICAL_EXT.get(ext, ext) if ext in IMAGE_EXTS else None


def brace_urls(out_dir: str | Path, n_shards: int) -> str:
    """The brace pattern naming shards 0..n-1 of `out_dir`, ready to paste into a config."""
    if n_shards <= 0:
        return ""
    if n_shards == 1:
        return f"{out_dir}/{0:05d}.tar"
    return f"{out_dir}/{{{0:05d}..{n_shards - 1:05d}}}.tar"


def classes_json(classes: list[str]) -> str:
    """`classes.json` content: class names in index order."""
    return json.dumps(list(classes), indent=1) + "\n"


class _OpenShard:
    """One tar being filled under a temp name; `commit` renames it, `abort` deletes it."""

    def __init__(self, out_dir: Path, index: int, mtime: float) -> None:
        self.name = f"{index:05d}.tar"
        self.path = out_dir / self.name
        self.tmp = out_dir / f".{self.name}.tmp"
        self.count = 0
        self.started = time.monotonic()
        self._file = open(self.tmp, "wb")
        self._tar = webdataset.TarWriter(self._file, mtime=mtime)

    def write(self, sample: ShardSample, ext: str) -> None:
        meta = {"key": sample.key, "caption": sample.caption, "cls": sample.cls, "source": sample.source}
        try:  # as img2dataset records them: a native-resolution stream sizes samples without decoding
            meta["width"], meta["height"] = image_header_size(sample.image)
        except CorruptSample:
            pass  # an unreadable image (written unverified): the reader skips and counts it
        members: dict[str, bytes | str] = {"__key__": sample.key, ext: sample.image}
        members["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        if sample.caption is not None:
            members["txt"] = sample.caption.encode("utf-8")
        if sample.cls is not None:
            members["cls"] = str(int(sample.cls)).encode("ascii")
        self._tar.write(members)
        self.count += 1

    def commit(self) -> None:
        self._tar.close()  # writes the tar end-of-archive blocks; our file object stays open
        self._file.close()
        publish_file(self.tmp, self.path)

    def abort(self) -> None:
        try:
            try:
                self._tar.close()  # else tarfile's finalizer later writes into the closed file
            finally:
                self._file.close()
        except OSError:
            pass  # the temp file is garbage either way; the original error is what matters
        finally:
            self.tmp.unlink(missing_ok=True)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """Create the directory; refuse to mix with existing shards unless told to replace them."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path exists and is not a directory: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("*.tar"))
    if existing and not overwrite:
        raise UserError(
            f"{out_dir} already holds {len(existing)} .tar shards (e.g. {existing[0].name}); "
            "use --overwrite (overwrite=True) to replace them"
        )
    for entry in out_dir.iterdir():
        # Temp files are debris of a killed run; owned files go only when overwriting, so a
        # smaller rewrite does not leave stale high-numbered shards behind.
        if _TEMP_RE.match(entry.name) or (overwrite and _OWNED_RE.match(entry.name)):
            entry.unlink()
    return out_dir.resolve()


def _reject_reason(sample: ShardSample, ext: str | None, verify: bool, require_caption: bool) -> str | None:
    """Why a sample cannot be written, or None. Without `verify` only hard failures count."""
    if sample.error:
        return sample.error
    if ext is None:
        return f"unsupported image extension {sample.image_ext!r} (expected one of {', '.join(IMAGE_EXTS)})"
    if not verify:
        return None
    if require_caption and not (sample.caption or "").strip():
        return "empty caption"
    if not sample.image:
        return "empty image file"
    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            img.load()  # full decode: a truncated JPEG only fails here, not in open()
    except Exception as err:  # noqa: BLE001 - any decoder failure means an unusable image
        return f"undecodable image ({one_line(err)})"
    return None


def write_shards(
    samples: Iterable[ShardSample],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    verify_images: bool = True,
    progress: bool = True,
    *,
    require_caption: bool = False,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> WriteReport:
    """Write `samples` into `00000.tar, 00001.tar, ...` in `out_dir` and return a report.

    `progress` shows rate and ETA over the input samples (`aimv2.progress`: a bar on a terminal,
    whole lines elsewhere) on stderr.
    `verify_images=False` writes every sample that has bytes as-is (no decode, no caption
    check): the fast path for trusted data, and how tests plant corrupt samples.
    `extra_files` (name -> content) are written atomically beside the shards, before
    `manifest.json`, whose presence therefore means the directory is complete.
    If `samples` raises, the shard being filled is deleted and the error propagates; shards
    completed before it stay valid, with their stats files, but no manifest is written.
    """
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out = _prepare_out_dir(Path(out_dir), overwrite)
    report = WriteReport(out_dir=out)
    mtime = int(time.time())
    shard: _OpenShard | None = None
    seen: set[str] = set()  # keys in the current shard: a repeat would merge two samples
    # Rate and ETA over input samples (skipped ones included); a total only when the source knows it.
    bar = progress_bar(
        total=len(samples) if hasattr(samples, "__len__") else None,
        desc=f"shards {out.name}",
        unit="img",
        enable=progress,
    )
    try:
        for sample in samples:
            bar.update(1)
            ext = image_ext(f"x.{sample.image_ext}")
            reason = _reject_reason(sample, ext, verify_images, require_caption)
            if reason is not None:
                report.skipped.append((sample.source or sample.key, reason))
                continue
            if not _KEY_RE.match(sample.key) or sample.key in seen:
                raise ValueError(f"sample key {sample.key!r} is not tar-safe or not unique in its shard")
            if shard is None:
                shard, seen = _OpenShard(out, len(report.shards), mtime), set()
            shard.write(sample, ext)
            seen.add(sample.key)
            if shard.count == samples_per_shard:
                _finish_shard(shard, report)
                shard = None
                bar.set_postfix(shards=len(report.shards), skipped=len(report.skipped))
        if shard is not None:
            _finish_shard(shard, report)
            shard = None
            bar.set_postfix(shards=len(report.shards), skipped=len(report.skipped))
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    finally:
        bar.close()
    report.total = sum(report.counts)
    report.urls = brace_urls(out, len(report.shards))
    for name, content in (extra_files or {}).items():
        atomic_write(out / name, content)
    entries = [ShardEntry(p.name, n, p.stat().st_size, head_digest(p)) for p, n in zip(report.shards, report.counts)]
    atomic_write(out / MANIFEST, manifest_json(entries, report.urls, skipped=len(report.skipped)))
    return report


def _finish_shard(shard: _OpenShard, report: WriteReport) -> None:
    """Commit the tar, then its img2dataset-style stats file (which counting tools read)."""
    shard.commit()
    stats = {
        "successes": shard.count,
        "count": shard.count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": round(time.monotonic() - shard.started, 3),
        "status_dict": {"success": shard.count},
    }
    atomic_write(shard.path.with_name(f"{shard.path.stem}_stats.json"), json.dumps(stats, indent=1) + "\n")
    report.shards.append(shard.path)
    report.counts.append(shard.count)
