"""Atomic writes have one home (aimv2/fileio.py): a file or directory appears complete or not at
all, an interrupted write leaves the old version and no temporary, and no other module renames
temporaries by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import aimv2.fileio
from aimv2.errors import UserError
from aimv2.fileio import (
    atomic_directory,
    atomic_file,
    atomic_write,
    discard,
    markdown_table,
    publish_directory,
    rename_noreplace,
)

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
    found = [
        f"{p.relative_to(PACKAGE.parent)}:{i}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "fileio.py"
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found


def _without_renameat2(monkeypatch) -> None:
    """What platforms and file systems without renameat2 get: the fallback paths."""
    monkeypatch.setattr(aimv2.fileio, "_renameat2", lambda src, dst, flags: False)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("old", ["dir", "file", "link"])
def test_a_published_directory_replaces_whatever_was_there(tmp_path, monkeypatch, renameat2, old):
    if not renameat2:
        _without_renameat2(monkeypatch)
    out = tmp_path / "last.ckpt"
    (tmp_path / "step=1.ckpt").mkdir()
    if old == "dir":
        out.mkdir()
        (out / "old").write_text("1")
    elif old == "file":
        out.write_text("a file checkpoint")
    else:
        out.symlink_to("step=1.ckpt")
    (tmp_path / ".last.ckpt.tmp").mkdir()
    (tmp_path / ".last.ckpt.tmp" / "new").write_text("2")
    publish_directory(tmp_path / ".last.ckpt.tmp", out)
    assert [p.name for p in out.iterdir()] == ["new"] and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=1.ckpt"]  # the link's target stays


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_rename_noreplace_never_replaces_anything(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        _without_renameat2(monkeypatch)
    (tmp_path / "src").mkdir()
    (tmp_path / "empty").mkdir()  # a plain rename would replace an empty directory
    (tmp_path / "file").write_text("x")
    for dst in ("empty", "file"):
        with pytest.raises(FileExistsError):
            rename_noreplace(tmp_path / "src", tmp_path / dst)
    rename_noreplace(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "empty", "file"]
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "src", tmp_path / "again")


def test_a_discarded_directory_leaves_its_name_before_it_is_deleted(tmp_path, monkeypatch):
    ckpt = tmp_path / "step=2.ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_text("index")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt(f"killed while deleting {path}")

    with monkeypatch.context() as patch:
        patch.setattr(aimv2.fileio.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            discard(ckpt)
    assert [p.name for p in tmp_path.iterdir()] == [".step=2.ckpt.removing"]  # never half of it under its name
    ckpt.mkdir()
    discard(ckpt)  # an earlier removal's leftover goes too
    discard(ckpt)  # a missing path is no error
    (tmp_path / "file.ckpt").write_text("x")
    discard(tmp_path / "file.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_markdown_table_escapes_pipes_and_line_breaks_and_checks_its_rows():
    assert markdown_table(["a", "b"], [[1, 2.5], ["x|y", ""], ["two\nlines", "kept \\| escape"]]) == (
        "| a | b |\n|---|---|\n| 1 | 2.5 |\n| x\\|y |  |\n| two lines | kept \\| escape |"
    )
    assert markdown_table(["n", "name"], [], align=["r", "l"]) == "| n | name |\n|---:|:---|"
    assert markdown_table(["n"], [], align="c").endswith("|:---:|")
    with pytest.raises(ValueError, match="row 0 has 1 cells, the header 2"):
        markdown_table(["a", "b"], [["only"]])
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], [], align=["r"])


def test_every_markdown_table_is_built_by_the_one_helper():
    """No code writes a table's separator line by hand (tables in docstrings aside): reports call
    aimv2.fileio.markdown_table."""
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(root / "benchmarks").glob("*.py"), *(root / "eval").glob("*.py")]
    by_hand = [
        f"{f.relative_to(root)}:{i}"
        for f in files
        if f.name != "fileio.py"
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if re.search(r"[\"']\|-{3}|-{3}\|?[\"']", line)
    ]
    assert not by_hand, f"Markdown tables built by hand (use aimv2.fileio.markdown_table): {by_hand}"
