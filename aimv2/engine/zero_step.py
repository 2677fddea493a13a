"""A real DeepSpeed ZeRO step and checkpoint on the CPU, in Lightning's checkpoint layout.

Lightning's DeepSpeed strategy runs only on CUDA, but DeepSpeed itself runs on the CPU (its CPU
accelerator, a gloo process group of one rank). This module steps the debug pre-training model once
under a ZeRO stage with gradient clipping and writes the checkpoint directory as Lightning's
DeepSpeedStrategy does (tag `checkpoint`, the hyper-parameters in the client state), plus the
engine's weights after the step, so the reader (aimv2.checkpoints.zero, load_encoder) can be checked
against what DeepSpeed really wrote. The rehearsal (aimv2.engine.rehearsal) and the checkpoint
tests use it.

DeepSpeed initializes torch.distributed and global state of its own: run it in a fresh process,
`python -m aimv2.engine.zero_step OUT IMG_SIZE STAGE [STAGE ...]` (`run_zero_check` does that).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_zero_check(
    out: Path, img_size: int = 28, stages: tuple[int, ...] = (2, 3), grad_clip: float = 1.0, timeout: int = 300
) -> dict[int, Path]:
    """Write OUT/zero{stage}/ (a ZeRO checkpoint after one optimizer step) and
    OUT/reference_{stage}.safetensors (the engine's weights after that step) for each stage, in a
    subprocess; raises RuntimeError with the subprocess's last lines when DeepSpeed fails."""
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    env = os.environ | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_network_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "DS_ACCELERATOR": "cpu",
    }
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "aimv2.engine.zero_step", str(out), str(img_size), str(grad_clip), *map(str, stages)],
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"DeepSpeed ZeRO step on the CPU failed:\n{tail}")
    return {stage: out / f"zero{stage}" for stage in stages}


def _main(out: Path, img_size: int, grad_clip: float, stages: list[int]) -> None:
    import importlib
    from dataclasses import asdict

    import deepspeed
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from aimv2.config import ModelConfig, ObjectiveConfig, OptimConfig
    from aimv2.models import AIMv2, get_size

    # The shared-memory allreduce kernel is a JIT-compiled speed-up (a minute of C++ compilation on a
    # fresh machine); one process needs no allreduce, so skip building it.
    # (`deepspeed.comm.torch` as an attribute is the torch package itself: fetch the module by name.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")

    class Wrapped(nn.Module):
        """Parameter names as Lightning's DeepSpeed strategy saves them (`model.encoder.*`, `model.decoder.*`);
        the LightningModule itself is not needed (importing Lightning costs seconds and adds nothing)."""

        def __init__(self):
            super().__init__()
            self.model = AIMv2(get_size("debug"), img_size, vocab_size=50, max_text_len=8)

        def forward(self, images, tokens):
            pixels, logits = self.model(images, tokens, None)
            return pixels.pow(2).mean() + logits.pow(2).mean()

    for stage in stages:
        torch.manual_seed(stage)
        model = Wrapped()
        # What AIMv2PretrainModule.save_hyperparameters records: plain dicts.
        hparams = {
            "model": asdict(ModelConfig("debug", img_size)),
            "objective": asdict(ObjectiveConfig()),
            "optim": asdict(OptimConfig()),
            "vocab_size": 50,
            "max_text_len": 8,
        }
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": stage},
            "gradient_clipping": grad_clip,
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config
        )
        loss = engine(torch.randn(2, 3, img_size, img_size), torch.randint(0, 50, (2, 8)))
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(
            str(out / f"zero{stage}"), tag="checkpoint", client_state={"hyper_parameters": hparams, "global_step": 1}
        )
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            reference = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
        save_file(reference, out / f"reference_{stage}.safetensors")


if __name__ == "__main__":
    _main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), [int(s) for s in sys.argv[4:]])
