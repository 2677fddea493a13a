"""Helpers shared by the checkpoint tests (no tests here): a briefly pre-trained debug checkpoint,
real DeepSpeed ZeRO checkpoints made on the CPU, and a script that loads exports with plain
timm / transformers in a fresh process that never imports aimv2.

Run as a script (`python checkpoint_helpers.py zero OUT`) it writes the ZeRO checkpoints: DeepSpeed
initializes torch.distributed and global state of its own, which must not leak into the test process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pretrain_debug(root: Path, img_size: int = 56, steps: int = 3) -> Path:
    """A few optimizer steps of the debug size on tiny random-image shards; returns last.ckpt."""
    from dataclasses import fields

    from conftest import write_caption_shards

    from aimv2.config import PretrainConfig, load_config
    from aimv2.training.pretrain import pretrain

    report = write_caption_shards(root / "shards", n=16, per_shard=8)
    overrides = [
        f"run_dir={root / 'run'}", f"data.sources=[{{urls: '{report.urls}'}}]", f"model.img_size={img_size}",
        "model.size=debug", "data.batch_size=4", "data.num_workers=1", "data.shuffle_buffer=0",
        "data.tokenizer.max_length=8", "optim.lr=1e-2", "optim.warmup_steps=1", f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=1000",
        "trainer.progress_bar=false",
    ]
    if "visualize" in {f.name for f in fields(PretrainConfig)}:  # prediction grids: not needed here
        overrides.append("visualize.every_n_steps=0")
    paths = pretrain(load_config(None, overrides))
    return paths["checkpoints"] / "last.ckpt"


# Runs in a fresh interpreter: loads each export with plain timm and transformers only.
PLAIN_LOAD_SCRIPT = r"""
import json, sys
import timm, torch, transformers
from safetensors.torch import load_file, save_file
images = load_file(sys.argv[1])["images"]
timm_dir, hf_dir, out = sys.argv[2], sys.argv[3], sys.argv[4]
cfg = json.load(open(timm_dir + "/config.json"))
by_dir = timm.create_model("local-dir:" + timm_dir, pretrained=True).eval()
by_name = timm.create_model(cfg["architecture"], pretrained=True,
                            pretrained_cfg_overlay=dict(file=timm_dir + "/model.safetensors"), **cfg["model_args"]).eval()
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD_SCRIPT, str(tmp / "images.safetensors"), str(timm_dir),
                           str(hf_dir), str(tmp / "plain.safetensors")], cwd=tmp, env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"plain timm/transformers load failed:\n{done.stderr[-3000:]}"
    return load_file(tmp / "plain.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_zero_checkpoints(out: Path, img_size: int = 28) -> dict[int, Path]:
    """ZeRO-2 and ZeRO-3 checkpoints of the debug pre-training model after one optimizer step, in
    Lightning's layout (tag 'checkpoint', client state with hyper_parameters), written by DeepSpeed
    itself on the CPU; plus OUT/reference_{2,3}.safetensors with the module's weights after the step."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(HERE / "checkpoint_helpers.py"), "zero", str(out), str(img_size)],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"writing ZeRO checkpoints failed:\n{done.stderr[-3000:]}"
    return {stage: out / f"zero{stage}" for stage in (2, 3)}


def _zero_main(out: Path, img_size: int) -> None:
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
        """Parameter names as Lightning's DeepSpeed strategy saves them (`model.encoder.*`, `model.decoder.*`).
        (The LightningModule itself is not used: importing Lightning costs seconds and adds nothing here.)"""

        def __init__(self):
            super().__init__()
            self.model = AIMv2(get_size("debug"), img_size, vocab_size=50, max_text_len=8)

        def forward(self, images, tokens):
            pixels, logits = self.model(images, tokens, None)
            return pixels.pow(2).mean() + logits.pow(2).mean()

    for stage in (2, 3):
        torch.manual_seed(stage)
        model = Wrapped()
        # What AIMv2PretrainModule.save_hyperparameters records: plain dicts.
        hparams = {"model": asdict(ModelConfig("debug", img_size)), "objective": asdict(ObjectiveConfig()),
                   "optim": asdict(OptimConfig()), "vocab_size": 50, "max_text_len": 8}
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=config)
        loss = engine(torch.randn(2, 3, img_size, img_size), torch.randint(0, 50, (2, 8)))
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(str(out / f"zero{stage}"), tag="checkpoint",
                               client_state={"hyper_parameters": hparams, "global_step": 1})
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            reference = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
        save_file(reference, out / f"reference_{stage}.safetensors")


if __name__ == "__main__":
    if sys.argv[1] == "zero":
        _zero_main(Path(sys.argv[2]), int(sys.argv[3]))
