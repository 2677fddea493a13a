"""The repository passes its linter and formatter: `ruff check .` and `ruff format --check .` from the root,
with the rules of pyproject.toml's [tool.ruff]. Fix with `ruff check --fix .` then `ruff format .`."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (it comes with the test extra: .[test])"
)


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_check():
    done = ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert done.returncode == 0, f"`ruff check .` found problems:\n{done.stdout}{done.stderr}"


def test_ruff_format():
    done = ruff("format", "--no-cache", "--check", ".")
    assert done.returncode == 0, f"`ruff format --check .` would reformat files:\n{done.stdout}{done.stderr}"
