"""The fsdp2 strategy through Lightning for real, on the CPU: Lightning 2.6.6's ModelParallelStrategy
has no accelerator check (its DeepSpeedStrategy.setup_environment raises "The DeepSpeed strategy is
only supported on CUDA GPUs but `CPUAccelerator` is used.") and torch 2.14's `fully_shard` runs on a
CPU device mesh with gloo, so `aimv2 pretrain --strategy fsdp2` trains on 2 CPU
processes, writes DCP checkpoint directories, and `trainer.resume=auto` continues the run on 1
process (another world size: DCP reshards): 23-33 s on 2 cores, hence `slow`. The GPU run (bf16,
NCCL) is tests/test_gpu_fsdp2.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, write_caption_shards

pytestmark = pytest.mark.slow


def test_fsdp2_trains_on_cpu_processes_and_resumes_at_another_world_size(tmp_path):
    from aimv2 import load_encoder
    from aimv2.checkpoints import detect_format
    from aimv2.engine.checkpointing import newest_intact

    report = write_caption_shards(tmp_path / "shards", 64, 32)
    run = tmp_path / "run"

    def pretrain(steps: int, devices: int, *extra: str) -> str:
        cmd = [
            sys.executable,
            "-m",
            "aimv2",
            "pretrain",
            str(REPO / "configs/pretrain/debug.yaml"),
            "--strategy",
            "fsdp2",
            f"run_dir={run}",
            f"data.sources=[{{urls: '{report.urls}'}}]",
            "model.img_size=28",
            "data.batch_size=4",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
            f"trainer.devices={devices}",
            "trainer.precision=32-true",
            f"trainer.max_steps={steps}",
            "trainer.checkpoint_every_n_steps=2",
            "trainer.progress_bar=false",
            "visualize.every_n_steps=0",
            "optim.warmup_steps=1",
            *extra,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    pretrain(2, 2)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and detect_format(last) == "dcp"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert newest_intact(run / "checkpoints") == last
    out = pretrain(3, 1, "trainer.resume=auto")
    assert "resuming from" in out and "finished after 3 steps" in out
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "meta.pt"]  # now one rank's
    encoder, preprocessing = load_encoder(last)
    assert preprocessing.img_size == 28 and not any(p.is_meta for p in encoder.parameters())
