"""Helpers shared by the checkpoint tests (no tests here): a briefly pre-trained debug checkpoint,
real DeepSpeed ZeRO checkpoints made on the CPU, and a script that loads exports with plain
timm / transformers in a fresh process that never imports aimv2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pretrain_debug(root: Path, img_size: int = 56, steps: int = 3) -> Path:
    """A few optimizer steps of the debug size on tiny random-image shards; returns last.ckpt."""
    from dataclasses import fields

    from aimv2.config import PretrainConfig, load_config
    from aimv2.pretraining.pretrain import pretrain
    from conftest import write_caption_shards

    report = write_caption_shards(root / "shards", n=16, per_shard=8)
    overrides = [
        f"run_dir={root / 'run'}",
        f"data.sources=[{{urls: '{report.urls}'}}]",
        f"model.img_size={img_size}",
        "model.size=debug",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.shuffle_buffer=0",
        "data.tokenizer.max_length=8",
        "optim.lr=1e-2",
        "optim.warmup_steps=1",
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=1000",
        "trainer.progress_bar=false",
    ]
    if "visualize" in {f.name for f in fields(PretrainConfig)}:  # prediction grids: not needed here
        overrides.append("visualize.every_n_steps=0")
    paths = pretrain(load_config(None, overrides))
    return paths.checkpoints / "last.ckpt"


# Runs in a fresh interpreter: loads each export with plain timm and transformers only.
PLAIN_LOAD_SCRIPT = r"""
import json, sys
import timm, torch, transformers
from safetensors.torch import load_file, save_file
images = load_file(sys.argv[1])["images"]
timm_dir, hf_dir, out = sys.argv[2], sys.argv[3], sys.argv[4]
cfg = json.load(open(timm_dir + "/config.json"))
by_dir = timm.create_model("local-dir:" + timm_dir, pretrained=True).eval()
overlay = dict(file=timm_dir + "/model.safetensors")
by_name = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                            **cfg["model_args"]).eval()
hf = transformers.Aimv2VisionModel.from_pretrained(hf_dir).eval()
processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
with torch.no_grad():
    result = {"timm_dir": by_dir.forward_features(images), "timm_name": by_name.forward_features(images),
              "hf": hf(pixel_values=images).last_hidden_state,
              "crop": torch.tensor([processor.crop_size["height"]]), "mean": torch.tensor(processor.image_mean)}
assert not any(m == "aimv2" or m.startswith("aimv2.") for m in sys.modules), "aimv2 was imported"
save_file({k: v.contiguous() for k, v in result.items()}, out)
"""


def plain_load(images, timm_dir: Path, hf_dir: Path, tmp: Path) -> dict:
    """Features of `images` from the timm and transformers exports, computed without aimv2."""
    from safetensors.torch import load_file, save_file

    save_file({"images": images.contiguous()}, tmp / "images.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_LOAD_SCRIPT,
            str(tmp / "images.safetensors"),
            str(timm_dir),
            str(hf_dir),
            str(tmp / "plain.safetensors"),
        ],
        cwd=tmp,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"plain timm/transformers load failed:\n{done.stderr[-3000:]}"
    return load_file(tmp / "plain.safetensors")


def write_zero_checkpoints(out: Path, img_size: int = 28) -> dict[int, Path]:
    """ZeRO-2 and ZeRO-3 checkpoints of the debug pre-training model after one optimizer step, in
    Lightning's layout, written by DeepSpeed itself on the CPU (aimv2.engine.rehearsal); plus
    OUT/reference_{2,3}.safetensors with the module's weights after the step."""
    from aimv2.engine.zero_step import run_zero_check

    return run_zero_check(out, img_size=img_size, stages=(2, 3))
