"""Atomic writes, the one home for them: results, configs, checkpoints, caches, exports and bundles
appear complete or not at all.

Every writer puts its bytes under a hidden temporary name beside the target (the same file system,
so the final `os.replace` is an atomic rename on POSIX), flushes them to disk, renames, and removes
the temporary on any error or interrupt. Readers (and `trainer.resume=auto`) see the old version or
the new one, never half of one.

- `atomic_write(path, data)`: a whole file from bytes or text.
- `atomic_file(path)`: a temporary path for writers that take a path (torch.save, safetensors,
  matplotlib, csv), renamed over `path` when the block ends without an error.
- `atomic_directory(out)`: a temporary directory, renamed to `out` when the block ends.
- `publish_file` / `publish_directory`: their last step, for writers that cannot sit in one block
  (a shard filled sample by sample, a ZeRO checkpoint directory written by every rank).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aimv2.errors import UserError


@contextmanager
def atomic_file(path: str | Path, tmp_name: str | None = None, sync_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (`.NAME.tmp`, or `tmp_name`); when the block ends without an
    error its file is fsynced and renamed over `path` (a symlink at `path` is replaced itself, not its
    target). `sync_dir` also persists the rename (the directory entry), where the platform allows it."""
    path = Path(path)
    tmp = path.with_name(tmp_name or f".{path.name}.tmp")
    try:
        yield tmp
        publish_file(tmp, path, sync_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write a whole file under a temp name beside it, then rename: readers never see half."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path) as tmp:
        tmp.write_bytes(payload)


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; when the block ends without an error every file in it
    is fsynced and it is renamed to `out` (replacing an old one only with overwrite=True); on any
    error or interrupt it is removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_file(tmp: str | Path, path: str | Path, sync_dir: bool = False) -> None:
    """The last step of every atomic file write: flush `tmp` to disk and rename it over `path` (for
    writers that keep a file open across calls, such as a shard being filled)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a symlink at `path` is replaced itself, not its target
    if sync_dir:
        fsync_dir(Path(path).parent)


def publish_directory(tmp: str | Path, out: str | Path, fsync: bool = True) -> None:
    """The last step of every atomic directory write: rename `tmp` to `out`. An old `out` directory is
    first moved aside to `.NAME.old` and deleted after (a file or link at `out` is unlinked), so `out`
    is missing only between two renames. `fsync=False` skips flushing the files (a DeepSpeed checkpoint
    whose shards other ranks wrote)."""
    tmp, out = Path(tmp), Path(out)
    if fsync:
        for f in sorted(tmp.rglob("*")):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(directory: str | Path) -> None:
    """Persist a rename itself (the directory entry), where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
