"""End to end: shards written by the project's writer (with planted corrupt samples), a short
pre-training of the debug size on real digit scans, losses falling, skips counted, checkpoints."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from aimv2.config import load_config
from aimv2.data.shards import ShardSample, write_shards
from aimv2.engine.logs import read_metric
from aimv2.pretraining.module import AIMv2PretrainModule
from aimv2.pretraining.pretrain import pretrain
from conftest import REPO

pytestmark = pytest.mark.slow  # the module fixture pre-trains 32 steps over real shards (10-15 s)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CORRUPT = {5: "undecodable", 20: "empty caption", 40: "no caption"}  # stream positions of the bad ones
N, BATCH, EPOCHS = 67, 8, 4  # 64 valid samples = 8 full batches per epoch; 32 steps


def digit_samples():
    digits = load_digits()
    for i in range(N):
        pixels = (digits.images[i] * 15).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").resize((56, 56), Image.BICUBIC).save(buf, "JPEG")
        sample = ShardSample(
            key=f"{i:09d}",
            image=buf.getvalue(),
            image_ext="jpg",
            caption=f"a handwritten digit {WORDS[digits.target[i]]}",
        )
        kind = CORRUPT.get(i)
        if kind == "undecodable":
            sample.image = sample.image[:40]  # a truncated JPEG
        elif kind == "empty caption":
            sample.caption = "  "
        elif kind == "no caption":
            sample.caption = None
        yield sample


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    report = write_shards(digit_samples(), root / "shards", samples_per_shard=100, verify_images=False, progress=False)
    overrides = [
        f"run_dir={root / 'run'}",
        f"data.sources=[{{urls: '{report.urls}'}}]",
        "model.img_size=56",
        "data.mode=epoch",
        f"data.batch_size={BATCH}",
        "data.num_workers=1",
        "data.shuffle_buffer=0",
        "data.tokenizer.max_length=16",
        "optim.lr=3e-3",
        "optim.warmup_steps=4",
        "trainer.max_steps=-1",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=16",
        "trainer.progress_bar=false",
    ]
    cfg = load_config(REPO / "configs/pretrain/debug.yaml", overrides)
    return cfg, pretrain(cfg), report


def test_writer_kept_the_planted_corrupt_samples(run):
    _, _, report = run
    assert report.total == N and report.skipped == []


def test_both_losses_fall(run):
    _, paths, _ = run
    for key in ("train/loss_img", "train/loss_text"):
        values = [v for _, v in read_metric(paths.metrics, key)]
        assert len(values) == N // BATCH * EPOCHS
        first, last = np.mean(values[:5]), np.mean(values[-5:])
        assert last < 0.9 * first, f"{key}: {first:.3f} -> {last:.3f}"


def test_skip_count_equals_corrupt_samples_read(run):
    _, paths, _ = run
    skipped = read_metric(paths.metrics, "data/skipped_samples")
    # every epoch passes over each corrupt sample once (its plan cannot know them: ranks must agree on it),
    # and its slack (67 samples, 8 batches of 8: 3 left over) absorbs them: every batch stays full
    assert skipped[-1][1] == len(CORRUPT) * EPOCHS


def test_run_directory_holds_config_checkpoints_and_logs(run):
    cfg, paths, _ = run
    assert load_config(paths.config) == cfg
    names = sorted(p.name for p in paths.checkpoints.iterdir())
    assert names == ["last.ckpt", "step=0000016.ckpt", "step=0000032.ckpt"]
    assert any(paths.tensorboard.glob("events.out.tfevents.*"))
    rates = read_metric(paths.metrics, "train/samples_per_sec")
    assert rates and all(r > 0 for _, r in rates)


def test_checkpoint_reloads_safely_and_resumes(run):
    cfg, paths, _ = run
    last = paths.checkpoints / "last.ckpt"
    raw = torch.load(last, map_location="cpu", weights_only=True)  # plain data only: no code runs
    assert raw["global_step"] == 32
    assert raw["hyper_parameters"]["vocab_size"] == 49408  # the tokenizer sets the text head
    module = AIMv2PretrainModule.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    for name, value in module.state_dict().items():
        assert torch.equal(value, raw["state_dict"][name]), name
    # the skipped-sample count comes back as the run's total (engine.logs.RankCounters), not as weights
    assert "skipped_samples" not in raw["state_dict"]
    assert raw["aimv2"]["rank_counters"]["skipped_samples"] == len(CORRUPT) * EPOCHS
    assert int(module.rank_counters.counts["skipped_samples"]) == len(CORRUPT) * EPOCHS
    # The reloaded encoder is the trained one: features differ from a fresh initialization.
    fresh = AIMv2PretrainModule(**raw["hyper_parameters"])
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert not torch.allclose(
            module.model.encoder.forward_features(images), fresh.model.encoder.forward_features(images)
        )
    # Resume: one more epoch continues the step count and the skip count.
    from dataclasses import replace

    more = replace(cfg, trainer=replace(cfg.trainer, resume=str(last), max_epochs=EPOCHS + 1))
    pretrain(more)
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 40
    assert read_metric(paths.metrics, "data/skipped_samples")[-1][1] == len(CORRUPT) * (EPOCHS + 1)
    steps = [s for s, _ in read_metric(paths.metrics, "train/loss_text")]
    assert steps == list(range(40)), "the resumed run appends to the metrics of the first, without gaps or repeats"
