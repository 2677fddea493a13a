"""A regular install carries what the commands need: the wheel holds every package of aimv2/ and every
config of configs/ (as aimv2/configs/...), and an installed aimv2 finds a documented `configs/...` path
from any directory. .ci/run installs that wheel into a fresh virtual environment and runs the demo
from another directory; this is the cheap check (a wheel build, about 2 s)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aimv2 import shipped
from conftest import REPO


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the sources, so the checkout gets no build/ or egg-info of this test's."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here (the build runs without isolation, offline)")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("aimv2", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("aimv2-*.whl")
    return wheel


def test_wheel_holds_every_package_and_config(tmp_path):
    with zipfile.ZipFile(_build_wheel(tmp_path)) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    configs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 19
    missing = [c for c in configs if f"aimv2/{c}" not in names]
    assert not missing, f"configs missing from the wheel (pyproject.toml's packages list): {missing}"
    packages = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "aimv2").rglob("__init__.py"))
    missing = [p for p in packages if p not in names]
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml's packages): {missing}"
    assert "aimv2 = aimv2.cli:main" in entry_points


def test_shipped_configs_are_this_checkouts():
    assert shipped.configs_dir() == REPO / "configs"
    assert shipped.shipped_config("probe/toy.yaml") == REPO / "configs/probe/toy.yaml"
    assert set(shipped.strategy_presets()) == {p.stem for p in (REPO / "configs/strategy").glob("*.yaml")}


def test_documented_config_path_works_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert shipped.user_config("configs/pretrain/debug.yaml") == REPO / "configs/pretrain/debug.yaml"
    assert "using the copy shipped with aimv2" in capsys.readouterr().err
    # A file of the user's wins, and nothing else is substituted.
    (tmp_path / "configs/pretrain").mkdir(parents=True)
    (tmp_path / "configs/pretrain/debug.yaml").write_text("trainer: {max_steps: 1}\n")
    assert shipped.user_config("configs/pretrain/debug.yaml") == Path("configs/pretrain/debug.yaml")
    assert shipped.user_config("configs/pretrain/nope.yaml") == Path("configs/pretrain/nope.yaml")
    assert shipped.user_config("mine.yaml") == Path("mine.yaml")
    assert capsys.readouterr().err == ""
