"""Feature extraction split across 2 real processes (torch.distributed, gloo on CPU) gives exactly the
single-process features; and the split of class shards over ranks covers every sample once."""

import pytest
import torch

from aimv2.data.demo import build_demo_shards
from aimv2.data.samples import eval_transform
from aimv2.probe.config import ProbeOptimConfig
from aimv2.probe.data import eval_batches, open_split
from aimv2.probe.features import ExtractJob, extract_distributed, extract_part, load_probe_encoder
from aimv2.probe.run import run_probe
from test_probe_helpers import small_config, write_colour_folders, write_tiny_checkpoint


@pytest.mark.slow
def test_two_process_extraction_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    demo = build_demo_shards(tmp_path / "data")
    split = open_split(demo["probe_val"]["dir"], "data.val")
    encoder, size, pre = load_probe_encoder(write_tiny_checkpoint(tmp_path / "m.ckpt", img_size=28))
    job = ExtractJob(encoder, split, eval_transform(size, pre.mean, pre.std), [], True, "float32", 64, 0, "cpu", False)
    one = extract_part(job)
    two = extract_distributed(job, 2, tmp_path / "parts")
    assert len(two["keys"]) == split.count == len(set(two["keys"]))
    order = sorted(range(len(one["keys"])), key=one["keys"].__getitem__)
    assert two["keys"] == [one["keys"][i] for i in order]
    torch.testing.assert_close(two["features"], one["features"][order], rtol=1e-4, atol=1e-5)
    assert torch.equal(two["labels"], one["labels"][order])


def test_rank_split_of_shards_covers_every_sample_once(tmp_path):
    demo = build_demo_shards(tmp_path / "data")
    split = open_split(demo["probe_train"]["dir"], "data.train")
    transform = lambda img: torch.zeros(1)  # noqa: E731 - only keys matter here
    for world in (1, 2, 3, 8):
        keys = []
        for rank in range(world):
            for batch in eval_batches(split, transform, 100, 0, rank, world):
                keys += batch["keys"]
        assert len(keys) == split.count == len(set(keys)), world


@pytest.mark.slow
def test_two_process_augmented_probe_covers_every_image_and_learns(tmp_path, monkeypatch):
    # The paper's mode on 2 real processes (gloo): each streams half the training images, gradients are
    # averaged (the run itself raises if the heads diverge across ranks), val is split and summed back.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt" / "model.ckpt")
    train = write_colour_folders(tmp_path / "train", 16, seed=0, corrupt=2)
    val = write_colour_folders(tmp_path / "val", 8, seed=1)
    optim = ProbeOptimConfig(lrs=[3e-3, 1e-2], weight_decays=[0.05], epochs=6, warmup_epochs=1)
    cfg = small_config(tmp_path, train, val, optim=optim, mode="augmented", devices=2, checkpoint=str(ckpt))
    cfg.data.batch_size = 8
    results = run_probe(cfg)
    assert results["val_count"] == 24 and results["skipped"] == {"train_last_epoch": 2, "val": 0}
    assert results["best"]["top1"] >= 90.0
    state = torch.load(tmp_path / "probe" / "heads.pt", weights_only=True)
    assert state["epoch"] == 6
