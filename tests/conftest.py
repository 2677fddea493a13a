"""Shared fixtures: small real shards written by the project's own writer."""

from __future__ import annotations

import io
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


@pytest.fixture(autouse=True)
def _isolated_process(monkeypatch):
    """Each test starts from the same environment and leaves no process group behind (an in-process
    Lightning DDP run would leave MASTER_PORT, LOCAL_RANK, ... for later tests' subprocesses)."""
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    with restored_process_state():
        yield
