"""Exact resume of real runs killed with SIGKILL mid-epoch (`aimv2 pretrain` in a subprocess, then
`trainer.resume=auto`), compared with uninterrupted runs of the same config.

Every consumed sample is logged per rank (trainer.log_samples). A resumed run must consume exactly
the samples, in exactly the order, of the uninterrupted one (so within each epoch every sample once)
and, on CPU in fp32 with the same thread count, end with bitwise-equal weights and optimizer state
(tolerance: none; the kernels and their order are the same)."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from aimv2.engine.checkpointing import checkpoint_step, newest_intact
from aimv2.engine.logs import read_metric
from aimv2.engine.stream_resume import read_sample_log
from conftest import REPO, write_caption_shards
from fault_helpers import run_or_show_stacks, tiny_tokenizer


def shard_urls(root: Path, counts, corrupt=()) -> str:
    """One shard per count (uneven sizes); '::' joins them."""
    for i, n in enumerate(counts):
        write_caption_shards(
            root / f"part{i}", n, 100, prefix=f"p{i}_", seed=i, corrupt_at={j for (s, j) in corrupt if s == i}
        )
    return "::".join(str(root / f"part{i}" / "00000.tar") for i in range(len(counts)))


def command(run_dir: Path, urls: str, *extra: str) -> list[str]:
    tokenizer = tiny_tokenizer(run_dir.parent / "tokenizer")
    return [
        sys.executable,
        "-m",
        "aimv2",
        "pretrain",
        str(REPO / "configs/pretrain/debug.yaml"),
        *tokenizer,
        f"run_dir={run_dir}",
        f"data.sources=[{{urls: '{urls}'}}]",
        "model.img_size=28",
        "data.mode=epoch",
        "data.batch_size=4",
        "data.num_workers=2",
        "data.shuffle_buffer=8",
        "data.tokenizer.max_length=8",
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.keep_checkpoints=2",
        "trainer.log_samples=true",
        "trainer.progress_bar=false",
        "visualize.every_n_steps=0",
        "optim.warmup_steps=2",
        *extra,
    ]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def train(cmd: list[str], cwd: Path, stderr: bool = False) -> str:
    """stdout (and stderr with `stderr`) of a run that must finish."""
    proc = run_or_show_stacks(cmd, cwd=cwd, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + (proc.stderr if stderr else "")


def train_and_kill(cmd: list[str], cwd: Path, sample_log: Path, after_step: int) -> str:
    """Start a run in its own process group; SIGKILL the whole group (every rank and data worker)
    as soon as `after_step` steps are logged: mid-epoch, after a checkpoint, mid-way to the next.
    Returns what the run printed to stderr (a file, not a pipe nobody drains while it runs)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if sample_log.exists() and any(step >= after_step for _, _, step, _ in read_sample_log(sample_log)):
                    break
                time.sleep(0.05)
            alive = proc.poll() is None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err.seek(0)
        text = err.read()
    assert alive, "the run ended before it could be killed: " + text[-2000:]
    return text


def load(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), f"{name} differs after the resume"
    states = (a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values())
    for sa, sb in zip(*states, strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"AdamW {key} differs after the resume"


def epochs_of(logs) -> dict[int, Counter]:
    seen: dict[int, Counter] = {}
    for rows in logs:
        for epoch, _, _, keys in rows:
            seen.setdefault(epoch, Counter()).update(keys)
    return seen


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    # 5 shards of 10..6 samples (2 corrupt) cut into 2 ranges of 20 for 2 data workers: 5 batches of 4
    # per worker and epoch (10 steps), a range holding a corrupt sample training a lighter batch.
    urls = shard_urls(tmp_path / "shards", (10, 9, 8, 7, 6), corrupt={(0, 3), (2, 5)})
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(command(full, urls), tmp_path)
    train_and_kill(command(cut, urls), tmp_path, cut / "logs/samples/rank0.tsv", after_step=5)
    start = newest_intact(cut / "checkpoints")
    assert checkpoint_step(start) in (3, 6, 9, 12, 15, 18)  # mid-epoch (epochs end at steps 10 and 20)
    out = train(command(cut, urls, "trainer.resume=auto"), tmp_path)
    assert f"resuming from {start}" in out

    full_log = read_sample_log(full / "logs/samples/rank0.tsv")
    cut_log = read_sample_log(cut / "logs/samples/rank0.tsv")
    assert cut_log == full_log, "the resumed run consumed other samples, or in another order"
    steps = load(full)["global_step"]
    assert [step for _, _, step, _ in full_log] == list(range(1, steps + 1)) and steps == 20
    seen = epochs_of([full_log])
    repeated = read_metric(full / "logs/metrics.csv", "data/repeated_samples")[-1][1]
    assert repeated == 0 and [max(s.values()) for s in seen.values()] == [1, 1]
    assert [len(s) for s in seen.values()] == [38, 38]  # every usable sample, every epoch (no remainder: 40 = 2 x 20)
    assert_same_state(load(full), load(cut))
    # metrics.csv: every step once, in order (a kill between a checkpoint and its step's row: the
    # checkpoint carries the row).
    logged = [s for s, _ in read_metric(cut / "logs/metrics.csv", "train/loss")]
    assert logged == list(range(steps))
    skipped = [read_metric(r / "logs/metrics.csv", "data/skipped_samples")[-1][1] for r in (full, cut)]
    assert skipped == [4, 4]  # each corrupt sample counted in each epoch that passed over it
    # keep_checkpoints=2: the two newest step checkpoints and last.ckpt (and the step checkpoint the run
    # resumed from, which Lightning never deletes); no temporaries of a save the kill interrupted.
    kept = {"last.ckpt", "step=0000015.ckpt", "step=0000018.ckpt", start.name}
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == sorted(kept)


@pytest.mark.slow
def test_two_rank_ddp_killed_and_resumed_sees_each_sample_once_per_epoch(tmp_path):
    # 5 shards (13+11+9+7+5 = 45) cut into 4 ranges of 11 for 2 ranks x 2 workers: 5 batches of 2 per
    # range, 10 steps per epoch.
    urls = shard_urls(tmp_path / "shards", (13, 11, 9, 7, 5))
    cut = tmp_path / "cut"
    ddp = ("trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2", "trainer.checkpoint_every_n_steps=2")
    train_and_kill(command(cut, urls, *ddp), tmp_path, cut / "logs/samples/rank1.tsv", after_step=3)
    assert checkpoint_step(newest_intact(cut / "checkpoints")) in (2, 4, 6, 8)  # mid-epoch (10 steps each)
    train(command(cut, urls, *ddp, "trainer.resume=auto"), tmp_path)

    logs = [read_sample_log(cut / f"logs/samples/rank{r}.tsv") for r in (0, 1)]
    steps = load(cut)["global_step"]
    for rows in logs:  # both ranks ran every step exactly once: nothing repeated, nothing lost
        assert [step for _, _, step, _ in rows] == list(range(1, steps + 1))
    for epoch, seen in epochs_of(logs).items():
        assert max(seen.values()) == 1, f"epoch {epoch}: a sample was seen twice (over both ranks)"
        assert len(seen) == steps // 2 * 2 * 2 == 40  # (steps per epoch: 2 epochs) x batch size 2 x 2 ranks
        per_rank = [{k for e, _, _, keys in rows if e == epoch for k in keys} for rows in logs]
        assert per_rank[0].isdisjoint(per_rank[1]), f"epoch {epoch}: the two ranks read the same samples"
