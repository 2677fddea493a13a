"""Atomic writes have one home (aimv2/fileio.py): a file or directory appears complete or not at
all, an interrupted write leaves the old version and no temporary, and no other module renames
temporaries by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aimv2.errors import UserError
from aimv2.fileio import atomic_directory, atomic_file, atomic_write, publish_directory

PACKAGE = Path(__file__).resolve().parents[1] / "aimv2"


def test_an_interrupted_file_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic_write(target, "old\n")
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with atomic_file(target) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_directory_is_replaced_whole_nested_files_included(tmp_path):
    out = tmp_path / "bundle"
    with atomic_directory(out) as tmp:
        (tmp / "lm").mkdir()
        (tmp / "lm" / "weights").write_text("1")
    with pytest.raises(UserError, match="already exists"), atomic_directory(out):
        pass
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("killed")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["lm", "lm/weights"]
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert [p.name for p in out.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_publishing_a_directory_over_a_file_or_link(tmp_path):
    (tmp_path / "last.ckpt").write_text("a file checkpoint")
    (tmp_path / ".tmp").mkdir()
    publish_directory(tmp_path / ".tmp", tmp_path / "last.ckpt", fsync=False)
    assert (tmp_path / "last.ckpt").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_no_module_renames_temporaries_by_hand():
    """Temp + rename lives in aimv2/fileio.py only (the other modules call it)."""
    pattern = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|\.replace\((?:tmp|path|out)\b")
    found = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in sorted(PACKAGE.rglob("*.py")) if p.name != "fileio.py"
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, found
