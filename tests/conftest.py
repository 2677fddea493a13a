"""Shared fixtures: small real shards written by the project's own writer."""

from __future__ import annotations

import io
import os
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


def write_caption_shards(
    out_dir: Path, n: int, per_shard: int, *, prefix: str = "", corrupt_at=(), seed: int = 0, overwrite: bool = False
):
    """n samples keyed f"{prefix}{i:06d}" with caption "sample i"; indices in corrupt_at get bad bytes."""
    rng = np.random.default_rng(seed)

    def samples():
        for i in range(n):
            image = b"definitely not an image" if i in corrupt_at else jpeg_bytes(rng)
            yield ShardSample(key=f"{prefix}{i:06d}", image=image, image_ext="jpg", caption=f"sample {i}")

    return write_shards(
        samples(), out_dir, samples_per_shard=per_shard, verify_images=False, progress=False, overwrite=overwrite
    )


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


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most 4. Most tests are a tiny model on
    one thread or a few subprocesses waiting on each other, so two workers on CI's two cores take about
    half the wall time of one; more than 4 would mostly add memory (each worker holds torch)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_configure(config):
    # Workers share the cores: torch in each uses its share, not all of them (oversubscribed OpenMP
    # threads spin against each other). Subprocesses that tests start set their own OMP_NUM_THREADS.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The two longest modules (pytest --durations: the documented commands about 7 min in all, the demo's
# probe-signal test 2.5 min) start first, then the other modules with slow tests, then the rest: with
# one module per worker, the longest jobs first keeps a worker from starting a long one at the end.
LONGEST_MODULES = ("test_documented_commands", "test_probe_signal")


def pytest_collection_modifyitems(config, items):
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.module.__name__
        return (
            LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES),
            name not in slow_modules,
        )

    items.sort(key=rank)  # stable: files and tests keep their order within a rank


def pytest_sessionstart(session):
    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free / 2**30
    if free < FREE_DISK_NEEDED_GB:
        pytest.exit(
            f"only {free:.1f} GB free under {where}; the test suite needs about {FREE_DISK_NEEDED_GB} GB "
            "there at its peak (set TMPDIR to a larger disk or free space)",
            returncode=1,
        )


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
