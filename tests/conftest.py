"""Shared fixtures: small real shards written by the project's own writer."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aimv2.data.shards import ShardSample, write_shards
from aimv2.engine.rehearsal import restored_process_state

REPO = Path(__file__).resolve().parents[1]


def jpeg_bytes(rng: np.random.Generator, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def write_caption_shards(out_dir: Path, n: int, per_shard: int, *, prefix: str = "", corrupt_at=(), seed: int = 0):
    """n samples keyed f"{prefix}{i:06d}" with caption "sample i"; indices in corrupt_at get bad bytes."""
    rng = np.random.default_rng(seed)

    def samples():
        for i in range(n):
            image = b"definitely not an image" if i in corrupt_at else jpeg_bytes(rng)
            yield ShardSample(key=f"{prefix}{i:06d}", image=image, image_ext="jpg", caption=f"sample {i}")

    return write_shards(samples(), out_dir, samples_per_shard=per_shard, verify_images=False, progress=False)


# The suite writes about 8 GB in all (checkpoints, shards, documented commands' workspaces); it keeps
# only what a failing test wrote (pyproject: tmp_path_retention_policy = "failed") and frees each
# module's shared fixtures after the module, so it needs a bounded amount of free disk at any time.
# A machine with less stops at once with the reason, instead of failing hundreds of tests halfway
# with "PytorchStreamWriter failed writing file" (seen in CI with the disk full).
FREE_DISK_NEEDED_GB = 4
_FAILED_MODULES: set[str] = set()
_SESSION_SHARED: set[Path] = set()


def shared_across_modules(path: Path) -> Path:
    """Keep `path` (made by tmp_path_factory) until the session ends: a cache that several test
    modules read (tests/viz_runs.py)."""
    _SESSION_SHARED.add(Path(path))
    return path


def pytest_sessionstart(session):
    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free / 2**30
    if free < FREE_DISK_NEEDED_GB:
        pytest.exit(f"only {free:.1f} GB free under {where}; the test suite needs about {FREE_DISK_NEEDED_GB} GB "
                    "there at its peak (set TMPDIR to a larger disk or free space)", returncode=1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_tmp_freed(request, tmp_path_factory):
    """Removes what this module's tests and fixtures wrote under the session's temp root once the
    module is done, unless one of its tests failed (then it stays for inspection)."""
    root = tmp_path_factory.getbasetemp()
    before = set(root.iterdir())
    yield
    if request.module.__name__ not in _FAILED_MODULES:
        for path in set(root.iterdir()) - before - _SESSION_SHARED:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_process(monkeypatch):
    """Each test starts from the same environment and leaves no process group behind (an in-process
    Lightning DDP run would leave MASTER_PORT, LOCAL_RANK, ... for later tests' subprocesses)."""
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    with restored_process_state():
        yield
