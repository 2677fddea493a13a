"""Helpers of the compress tests: a real `aimv2 pretrain` checkpoint of the debug encoder written
without a training run, and the small config every compress test starts from."""

from __future__ import annotations

from pathlib import Path

import lightning
import torch

from aimv2.compress.config import CompressConfig
from aimv2.config import load_config
from aimv2.pretraining.module import AIMv2PretrainModule

TINY_LM = ["lm.hidden_size=32", "lm.num_layers=2", "lm.num_heads=4", "lm.intermediate_size=64", "lm.max_positions=128"]


def write_encoder_checkpoint(path: Path, img_size: int = 56, seed: int = 0) -> Path:
    """A Lightning checkpoint of a freshly initialized debug-size pre-training module (the layout
    `aimv2 pretrain` writes: plain-dict hyper-parameters + state_dict)."""
    torch.manual_seed(seed)
    module = AIMv2PretrainModule({"size": "debug", "img_size": img_size}, {}, {}, vocab_size=64, max_text_len=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path


def compress_config(tmp: Path, encoder: Path, train: str, *overrides: str, val: str = "") -> CompressConfig:
    return load_config(
        None,
        [
            f"encoder.source={encoder}",
            f"data.train='{train}'",
            f"data.val='{val}'",
            f"run_dir={tmp / 'run'}",
            "data.num_workers=0",
            "data.batch_size=16",
            "data.shuffle_buffer=200",
            "text.tokenizer.max_length=16",
            "trainer.accelerator=cpu",
            "trainer.progress_bar=false",
            "trainer.max_steps=10",
            "trainer.log_every_n_steps=1",
            "trainer.checkpoint_every_n_steps=1000",
            *TINY_LM,
            *overrides,
        ],
        schema=CompressConfig,
    )
