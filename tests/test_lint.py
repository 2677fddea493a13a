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


def test_the_commit_msg_hook_refuses_subjects_of_72_characters_or_more(tmp_path):
    hook = REPO / ".githooks" / "commit-msg"
    message = tmp_path / "COMMIT_EDITMSG"
    for subject, ok in (("x" * 71, True), ("x" * 72, False), ("Short subject", True)):
        message.write_text(f"# a comment line git strips\n{subject}\n\nbody " + "y" * 200 + "\n")
        done = subprocess.run(["sh", str(hook), str(message)], capture_output=True, text=True)
        assert (done.returncode == 0) == ok, (subject, done.stderr)
        assert ok or "keep it under 72" in done.stderr
