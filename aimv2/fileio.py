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
- `discard(path)`: the reverse: a directory leaves its name in one rename before it is deleted.
- `rename_noreplace(src, dst)`: a rename that never replaces what is at `dst` (putting a checkpoint back
  or aside, aimv2.engine.checkpointing).

Hidden names beside a target: `.NAME.tmp` (being written), `.NAME.old` (the version being replaced,
while a directory is published without an atomic swap), `.NAME.removing` (being deleted).

It also holds the Markdown table writer of every report (`markdown_table`): results, plans, scaling laws,
ablations, run reports, benchmarks and evaluation scripts build their tables with it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from aimv2.errors import UserError

TMP_SUFFIX = ".tmp"  # `.NAME.tmp` (and `.NAME.<pid>.tmp`): being written
OLD_SUFFIX = ".old"  # `.NAME.old`: the version a directory publish is replacing
REMOVING_SUFFIX = ".removing"  # `.NAME.removing`: a directory being deleted (discard)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100
# What renameat2 answers where the platform or the file system lacks it (then the caller falls back).
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


@contextmanager
def atomic_file(path: str | Path, tmp_name: str | None = None, sync_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (`.NAME.tmp`, or `tmp_name`); when the block ends without an
    error its file is fsynced and renamed over `path` (a symlink at `path` is replaced itself, not its
    target). `sync_dir` also persists the rename (the directory entry), where the platform allows it."""
    path = Path(path)
    tmp = path.with_name(tmp_name or f".{path.name}{TMP_SUFFIX}")
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
    """The last step of every atomic directory write: put `tmp` at `out`, replacing whatever is there (a
    directory, file or link). `fsync=False` skips flushing the files (a DeepSpeed checkpoint whose shards
    other ranks wrote).

    Where the OS and file system allow it (Linux renameat2 with RENAME_EXCHANGE; local file systems such as
    ext4 have it, network ones may not) the two swap names in one atomic step and `out` is never missing;
    the old version, now under `tmp`'s name, is deleted after. Elsewhere the old `out` is first renamed to
    `.NAME.old` and `tmp` to `out`: a kill between the two leaves no `out`, and
    aimv2.engine.checkpointing.recover_interrupted_publish puts the newest complete one back at the next start."""
    tmp, out = Path(tmp), Path(out)
    if fsync:
        for f in sorted(tmp.rglob("*")):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
    old = out.with_name(f".{out.name}{OLD_SUFFIX}")
    _remove(old)  # a leftover of an earlier publish, never the live version (`out` exists or `tmp` is new)
    if out.is_symlink() or out.exists():
        if _renameat2(tmp, out, _RENAME_EXCHANGE):
            fsync_dir(out.parent)
            _remove(tmp)  # the old version; a kill here leaves a temporary (remove_stale_temporaries)
            return
        # A file or link is moved aside as well (not unlinked): `.NAME.old` marks the window for recovery.
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    _remove(old)


def discard(path: str | Path) -> None:
    """Remove a file, link or directory without ever leaving part of it under its name: a directory is
    renamed to a hidden `.NAME.removing` beside it (one atomic step) and deleted there, so a kill during
    the delete leaves only that hidden name (aimv2.engine.checkpointing.remove_stale_temporaries clears
    it). A missing `path` is no error."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}{REMOVING_SUFFIX}")
    _remove(trash)  # an earlier removal's leftover
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """Rename `src` to `dst` in one atomic step, never replacing anything at `dst` (FileExistsError then):
    safe when several processes try the same rename at once, exactly one succeeds. Without renameat2 the
    check and the rename are two steps (a directory is still never renamed over a non-empty one)."""
    src, dst = Path(src), Path(dst)
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if dst.is_symlink() or dst.exists():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree at `path`, if any."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2) with `flags`; False where the platform, libc or file system lacks it (the
    caller falls back), OSError for every other failure (a missing `src`, an existing `dst`, ...)."""
    func = _libc_renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


@functools.cache
def _libc_renameat2():
    """libc's renameat2 (glibc >= 2.28), None where there is none."""
    try:
        func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to load by name (Windows)
        return None
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        func.restype = ctypes.c_int
    return func


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


_ALIGN = {"": "---", "l": ":---", "c": ":---:", "r": "---:"}


def markdown_table(header: Sequence, rows: Sequence[Sequence], align: str | Sequence[str] = "") -> str:
    """A GitHub Markdown table: the header line, the alignment line and one line per row, each `| a | b |`,
    joined by newlines with none at the end. Cells are `str()` of what is given: callers format their own
    numbers. A `|` in a cell is escaped (`\\|`) and a line break becomes a space, so no cell ends early or
    breaks its row. `align`: "" (`---`, the default), "l", "c" or "r" for every column, or one of those per
    column. A row with another number of cells than the header is a ValueError."""
    aligns = [align] * len(header) if isinstance(align, str) else list(align)
    if len(aligns) != len(header) or any(a not in _ALIGN for a in aligns):
        raise ValueError(f"align: one of {sorted(_ALIGN)} for all {len(header)} columns or for each, got {align!r}")
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, the header {len(header)}: {list(row)!r}")

    def line(cells: Sequence) -> str:
        return "| " + " | ".join(_markdown_cell(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "".join(f"{_ALIGN[a]}|" for a in aligns)] + [line(r) for r in rows])


def _markdown_cell(value) -> str:
    """One table cell's text: a `|` escaped, line breaks as spaces (an already escaped `\\|` is kept)."""
    text = str(value).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return re.sub(r"(?<!\\)\|", r"\\|", text)
