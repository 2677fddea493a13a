"""On a GPU only (marker `gpu`, skipped elsewhere): the fsdp2 preset as shipped (bf16-mixed, activation
checkpointing, NCCL) trains the debug size, saves DCP directories, resumes from `trainer.resume=auto`,
and the directory converts to one file and exports. The same path on CPU processes with gloo (fp32)
runs in tests/test_fsdp2_lightning.py; this adds what only CUDA shows (NCCL collectives, bf16
autocast on the GPU, device placement of the sharded states on resume)."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO, write_caption_shards

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fsdp2_trains_saves_resumes_converts_and_exports_on_gpu(tmp_path):
    report = write_caption_shards(tmp_path / "shards", 256, 64)
    run = tmp_path / "run"
    devices = min(torch.cuda.device_count(), 2)

    def aimv2(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "aimv2", *args], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def pretrain(steps, *extra):
        return aimv2(
            "pretrain",
            str(REPO / "configs/pretrain/debug.yaml"),
            "--strategy",
            "fsdp2",
            f"run_dir={run}",
            f"data.sources=[{{urls: '{report.urls}'}}]",
            "model.img_size=56",
            "data.batch_size=8",
            "data.num_workers=2",
            "trainer.accelerator=gpu",
            f"trainer.devices={devices}",
            f"trainer.max_steps={steps}",
            "trainer.checkpoint_every_n_steps=10",
            "trainer.progress_bar=false",
            "visualize.every_n_steps=0",
            "optim.warmup_steps=5",
            *extra,
        )

    pretrain(20)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file() and (last / "meta.pt").is_file()
    from aimv2.engine.logs import read_metric

    assert read_metric(run / "logs/metrics.csv", "train/grad_norm"), "no train/grad_norm: clipping did not run"
    out = pretrain(30, "trainer.resume=auto")
    assert "resuming from" in out and "finished after 30 steps" in out
    aimv2("checkpoint", "convert", str(last), str(tmp_path / "one.ckpt"))
    aimv2("export", str(last), "--format", "aimv2", "--out", str(tmp_path / "export"))
    from aimv2 import load_encoder

    a, _ = load_encoder(tmp_path / "one.ckpt")
    b, _ = load_encoder(tmp_path / "export")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
