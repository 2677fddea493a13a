"""A native-resolution pre-training run end to end (configs/pretrain/debug_native.yaml on real shards
of images of varied sizes, written by the project's writer): it trains, a run resumed from a
mid-run checkpoint ends bitwise equal to the uninterrupted one, and it continues a fixed-size run
through model.init_from (its learned position table left behind)."""

from __future__ import annotations

import shutil

import torch

from aimv2.config import load_config
from aimv2.data.shards import ShardSample, write_shards
from aimv2.engine.logs import read_metric
from aimv2.engine.stream_resume import read_sample_log
from aimv2.pretraining.pretrain import pretrain
from conftest import REPO
from test_native_data import SIZES, jpeg, words


def shards(root):
    samples = [
        ShardSample(f"s{i:04d}", jpeg(*SIZES[i % len(SIZES)], i), "jpg", caption=f"sample {i % 10}") for i in range(48)
    ]
    return write_shards(samples, root / "shards", samples_per_shard=16, progress=False).urls


def config(root, run: str, urls: str, *extra: str):
    return load_config(
        REPO / "configs/pretrain/debug_native.yaml",
        [
            f"run_dir={root / run}",
            f"data.sources=[{{urls: '{urls}'}}]",
            f"data.tokenizer.path={words(root)}",
            "data.num_workers=1",
            "data.shuffle_buffer=8",
            "data.native.window=16",
            "trainer.max_steps=6",
            "trainer.checkpoint_every_n_steps=3",
            "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false",
            "optim.warmup_steps=2",
            *extra,
        ],
    )


def last(run_dir):
    return torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)


def test_a_native_run_trains_and_resumes_bitwise(tmp_path):
    urls = shards(tmp_path)
    full = pretrain(config(tmp_path, "full", urls))
    state = last(full.root)
    assert state["hyper_parameters"]["model"]["native"] is True
    assert "model.encoder.pos_embed" not in state["state_dict"]  # 2-D sin-cos: nothing learned
    losses = [v for _, v in read_metric(full.metrics, "train/loss")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # A second run that has only the step-3 checkpoint continues to the same weights, bit for bit.
    cut = tmp_path / "cut" / "checkpoints"
    cut.mkdir(parents=True)
    shutil.copy(full.checkpoints / "step=0000003.ckpt", cut)
    resumed = pretrain(config(tmp_path, "cut", urls, "trainer.resume=auto"))
    assert [s for s, _ in read_metric(resumed.metrics, "train/loss")] == [3, 4, 5]  # it resumed, at step 3
    a, b = state, last(resumed.root)
    assert a["global_step"] == b["global_step"] == 6
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), f"{name} differs after the resume"


def test_a_native_run_draws_its_prediction_frames(tmp_path):
    run = pretrain(
        config(
            tmp_path,
            "frames",
            shards(tmp_path),
            "visualize.every_n_steps=3",
            "trainer.max_steps=3",
            "visualize.num_images=3",
        )
    )
    assert sorted(p.name for p in run.visualizations.glob("step=*.png")) == ["step=0000000.png", "step=0000003.png"]
    fixed = torch.load(run.visualizations / "fixed_batch.pt", weights_only=True)
    images = fixed["image"]  # the first images of the first image's grid, at that grid
    assert images.dim() == 4 and images.shape[1] == 3 and images.shape[2] % 14 == 0 and images.shape[3] % 14 == 0
    assert len(fixed["captions"]) == images.shape[0] and all(c.startswith("sample") for c in fixed["captions"])


def test_a_native_stage_continues_a_fixed_size_run(tmp_path, capsys):
    urls = shards(tmp_path)
    fixed = pretrain(
        load_config(
            REPO / "configs/pretrain/demo.yaml",
            [
                f"run_dir={tmp_path / 'fixed'}",
                f"data.sources=[{{urls: '{urls}'}}]",
                f"data.tokenizer.path={words(tmp_path)}",
                "data.num_workers=0",
                "trainer.max_steps=2",
                "trainer.progress_bar=false",
                "visualize.every_n_steps=0",
            ],
        )
    )
    capsys.readouterr()
    native = pretrain(
        config(tmp_path, "native", urls, f"model.init_from={fixed.checkpoints / 'last.ckpt'}", "trainer.max_steps=1")
    )
    out = capsys.readouterr().out
    assert "learned position table (16 tokens) is replaced by the native 2-D sin-cos embedding" in out
    a, b = last(fixed.root)["state_dict"], last(native.root)["state_dict"]
    assert "model.encoder.pos_embed" in a and "model.encoder.pos_embed" not in b


def test_a_native_epoch_sees_every_sample_once_on_two_workers(tmp_path):
    """Epoch mode: a batch is data.batch_size images packed into as many rows as they need, so the
    step count is planned from sample counts and the sample log shows each sample once per epoch."""
    urls = shards(tmp_path)  # 48 samples in 3 shards of 16
    run = pretrain(
        config(
            tmp_path,
            "epochs",
            urls,
            "data.mode=epoch",
            "data.batch_size=5",
            "data.num_workers=2",
            "trainer.max_steps=-1",
            "trainer.max_epochs=2",
            "trainer.log_samples=true",
        )
    )
    log = read_sample_log(run.root / "logs/samples/rank0.tsv")
    # 48 samples cut into 2 ranges of 24 -> 24 // 5 = 4 batches per slot, 8 per epoch
    assert last(run.root)["global_step"] == 16 and [step for _, _, step, _ in log] == list(range(1, 17))
    for epoch in (0, 1):
        keys = [k for e, _, _, batch in log if e == epoch for k in batch]
        assert len(keys) == 40 and len(set(keys)) == 40, f"epoch {epoch}: a sample repeated"
