"""Real multi-process DDP on CPU (gloo, 2 ranks) through the CLI, on uneven shards: no hang, and
every rank runs the same number of steps."""

import os
import sys

import pytest
import torch

from aimv2.engine.logs import read_metric
from conftest import REPO, write_caption_shards
from fault_helpers import run_or_show_stacks


@pytest.mark.slow
def test_two_rank_ddp_on_uneven_shards_finishes(tmp_path):
    # 3 shards of 25 + 17 + 9 samples cannot split evenly over 2 ranks: packing gives 25 vs 26.
    for i, n in enumerate((25, 17, 9)):
        write_caption_shards(tmp_path / "shards" / f"part{i}", n, 100, prefix=f"p{i}_", seed=i)
    urls = "::".join(str(tmp_path / "shards" / f"part{i}" / "00000.tar") for i in range(3))
    cmd = [
        sys.executable,
        "-m",
        "aimv2",
        "pretrain",
        str(REPO / "configs/pretrain/debug.yaml"),
        f"run_dir={tmp_path / 'run'}",
        f"data.sources=[{{urls: '{urls}'}}]",
        "model.img_size=28",
        "data.mode=epoch",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.tokenizer.max_length=8",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "optim.warmup_steps=2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = run_or_show_stacks(cmd, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    # Two ranks ran: each read its share (25 and 26 samples -> 6 batches of 4 per epoch), so 2 epochs are
    # 12 optimizer steps (one process reading all 51 samples would make 24) ...
    assert ckpt["global_step"] == 12
    steps = [s for s, _ in read_metric(tmp_path / "run/logs/metrics.csv", "train/loss")]
    assert steps == list(range(12))
    # ... and the checkpoint's stream position was gathered from both processes (a collective that rank 1
    # answered): one slot table per rank, each rank's worker having consumed its batches of the last epoch.
    stream = ckpt["PretrainDataModule"]["stream"]
    assert stream["layout"]["world_size"] == 2 and stream["consumed"] == 6
    assert stream["lanes"][:, 0].tolist() == [0, 1]  # one lane per rank (no data workers), each with a position
