"""A resumed augmented probe continues the data order: its epoch k draws the shuffle an uninterrupted
run draws in epoch k, not epoch 0's again.

The augmented probe resumes from heads.pt after its last finished epoch and positions its training
loader there (aimv2.probe.augmented.train_loader). Both loaders it can get (class-labelled shards
through the project's ShardStream, and class folders) seed their shuffle by the epoch; once the
position was written to a private attribute the shard loader no longer read, and every resumed run
replayed epoch 0's order."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimv2.data.shard_inputs import class_tree_samples
from aimv2.data.shards import classes_json, write_shards
from aimv2.probe.augmented import AugmentedJob, train_loader
from aimv2.probe.config import ProbeConfig, ProbeDataConfig
from aimv2.probe.data import open_split
from test_probe_helpers import write_colour_folders


def _job(split_dir: Path, tmp_path: Path) -> AugmentedJob:
    """Only what the loader reads: the training split, the batch and stream settings, the image size."""
    cfg = ProbeConfig(
        data=ProbeDataConfig(train=str(split_dir), val=str(split_dir), batch_size=4, num_workers=0, shuffle_buffer=8),
        mode="augmented",
        accelerator="cpu",
    )
    split = open_split(str(split_dir), "data.train")
    return AugmentedJob(
        grid=None,
        encoder=None,
        train=split,
        val=split,
        cfg=cfg,
        size=28,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        state_path=tmp_path / "heads.pt",
        fingerprint="",
    )


def _order(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]


@pytest.mark.parametrize("kind", ["shards", "folders"])
def test_resumed_epoch_draws_the_uninterrupted_order(tmp_path, kind):
    folders = write_colour_folders(tmp_path / "folders", per_class=8)
    split_dir = folders
    if kind == "shards":
        samples = class_tree_samples(folders)
        split_dir = tmp_path / "shards"
        write_shards(
            samples,
            split_dir,
            samples_per_shard=6,
            verify_images=False,
            progress=False,
            extra_files={"classes.json": classes_json(samples.classes)},
        )
    job = _job(split_dir, tmp_path)
    uninterrupted = train_loader(job, rank=0, world=1, start_epoch=0)
    epochs = [_order(uninterrupted) for _ in range(3)]
    assert len(epochs[0]) >= 16 and len({tuple(e) for e in epochs}) == 3  # each epoch has its own order
    for k in (1, 2):
        resumed = train_loader(job, rank=0, world=1, start_epoch=k)  # heads.pt said k epochs are done
        assert _order(resumed) == epochs[k] != epochs[0]
    resumed = train_loader(job, rank=0, world=1, start_epoch=1)
    assert [_order(resumed), _order(resumed)] == epochs[1:]  # and the epochs after it count on
