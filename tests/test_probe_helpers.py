"""Helpers shared by the probe tests (no tests here): tiny checkpoints and tiny class-folder sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aimv2.config import validate_config
from aimv2.probe.config import ProbeConfig, ProbeDataConfig, ProbeHeadConfig, ProbeOptimConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_tiny_checkpoint(path: Path, img_size: int = 28, seed: int = 0) -> Path:
    """A random-init `aimv2 pretrain` checkpoint of the debug size, as Lightning would save it."""
    import lightning

    from aimv2.pretraining.module import AIMv2PretrainModule

    torch.manual_seed(seed)
    module = AIMv2PretrainModule({"size": "debug", "img_size": img_size}, {}, {}, vocab_size=100, max_text_len=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        path,
    )
    return path


def colour_image(rng: np.random.Generator, colour, size: int = 32) -> Image.Image:
    base = np.array(colour, np.float32)
    pixels = base + rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_colour_folders(root: Path, per_class: int, seed: int = 0, classes=COLOURS, corrupt: int = 0) -> Path:
    """root/<colour>/<i>.jpg: noisy solid colours (trivially separable); `corrupt` bad files in the first class."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour_image(rng, colour).save(d / f"{i:04d}.jpg", quality=90)
    first = root / next(iter(classes))
    for i in range(corrupt):
        (first / f"bad{i}.jpg").write_bytes(b"not an image at all")
    return root


def small_config(tmp: Path, train: Path, val: Path, **kw) -> ProbeConfig:
    optim = kw.pop("optim", ProbeOptimConfig(lrs=[1e-3, 1e-2], weight_decays=[0.05], epochs=5, warmup_epochs=1))
    head = kw.pop("head", ProbeHeadConfig())
    cfg = ProbeConfig(
        checkpoint=kw.pop("checkpoint", str(tmp / "ckpt" / "model.ckpt")),
        run_dir=str(tmp / "probe"),
        data=ProbeDataConfig(train=str(train), val=str(val), batch_size=16, num_workers=0),
        optim=optim,
        head=head,
        accelerator="cpu",
        progress_bar=False,
        **kw,
    )
    validate_config(cfg)
    return cfg
