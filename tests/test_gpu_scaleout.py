"""On a GPU only (marker `gpu`, skipped elsewhere): DeepSpeed ZeRO-2/3 and FSDP really train the
debug size in bf16, save, resume to more steps from `trainer.resume=auto`, and the checkpoint
(a ZeRO directory or an FSDP file) exports to an fp32 encoder. Lightning refuses these strategies
on the CPU accelerator, so CI checks them as configuration (test_strategy.py) and this file runs
where CUDA is. Figures at a real size: benchmarks/scaleout.py."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO, write_caption_shards

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("preset", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_strategy_trains_saves_resumes_and_exports(tmp_path, preset):
    if preset.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    report = write_caption_shards(tmp_path / "shards", 256, 64)
    run = tmp_path / "run"

    def pretrain(steps, *extra):
        cmd = [
            sys.executable,
            "-m",
            "aimv2",
            "pretrain",
            str(REPO / "configs/pretrain/debug.yaml"),
            "--strategy",
            preset,
            f"run_dir={run}",
            f"data.sources=[{{urls: '{report.urls}'}}]",
            "model.img_size=56",
            "data.batch_size=8",
            "data.num_workers=2",
            "trainer.accelerator=gpu",
            "trainer.devices=1",
            f"trainer.max_steps={steps}",
            "trainer.checkpoint_every_n_steps=10",
            "trainer.progress_bar=false",
            "visualize.every_n_steps=0",
            "optim.warmup_steps=5",
            *extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    pretrain(20)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() == preset.startswith("deepspeed")  # ZeRO checkpoints are directories
    if not preset.startswith("deepspeed"):  # bf16 + clip 1.0 + fused AdamW: the norm is logged where we clip
        from aimv2.engine.logs import read_metric

        assert read_metric(run / "logs/metrics.csv", "train/grad_norm"), "no train/grad_norm: clipping did not run"
    out = pretrain(30, "trainer.resume=auto")
    assert "resuming from" in out and "finished after 30 steps" in out
    export = subprocess.run(
        [sys.executable, "-m", "aimv2", "export", str(last), "--format", "aimv2", "--out", str(tmp_path / "export")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert export.returncode == 0, export.stderr[-2000:]
