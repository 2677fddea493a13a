"""Two short real pre-training runs shared by the visualization, report and progress tests.

Run "lr_a" goes through the CLI in a subprocess with stdout and stderr piped (what CI and SLURM
see), so its output is checked for carriage returns; run "lr_b" trains in-process with another
learning rate, so the report has a config difference to find. Built once per test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aimv2.config import load_config
from aimv2.pretraining.pretrain import pretrain
from conftest import REPO, shared_across_modules, write_caption_shards

STEPS, EVERY, IMAGES, IMG = 6, 3, 2, 28
_CACHE: dict = {}


def overrides(run_dir: Path, urls: str, lr: float) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.sources=[{{urls: '{urls}'}}]",
        f"model.img_size={IMG}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        "data.tokenizer.max_length=12",
        f"optim.lr={lr}",
        "optim.warmup_steps=2",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=100",
        f"visualize.every_n_steps={EVERY}",
        f"visualize.num_images={IMAGES}",
        "visualize.max_caption_tokens=5",
    ]


def short_runs(tmp_path_factory) -> dict:
    """{"root", "a", "b": run dirs, "a_output": the CLI's stdout + stderr, "a_returncode"}."""
    if "runs" in _CACHE:
        return _CACHE["runs"]
    root = shared_across_modules(tmp_path_factory.mktemp("viz_runs"))  # test_viz_run and test_report read it
    shards = write_caption_shards(root / "shards", 24, 12)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMV2_PROGRESS")}
    env |= {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2",
            "pretrain",
            str(REPO / "configs/pretrain/debug.yaml"),
            *overrides(root / "runs" / "lr_a", shards.urls, 2e-3),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    cfg = load_config(REPO / "configs/pretrain/debug.yaml", overrides(root / "runs" / "lr_b", shards.urls, 5e-4))
    pretrain(cfg)
    _CACHE["runs"] = {
        "root": root,
        "a": root / "runs" / "lr_a",
        "b": root / "runs" / "lr_b",
        "a_output": proc.stdout + proc.stderr,
        "a_stdout": proc.stdout,
        "a_returncode": proc.returncode,
    }
    return _CACHE["runs"]
