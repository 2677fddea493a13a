"""Checkpoints at their edges, each killed or corrupted exactly there:

- the publish window: a directory checkpoint (ZeRO, DCP) replaced without an atomic swap and killed
  between its two renames has no `NAME`; the start-up cleanup and `trainer.resume=auto` put the newest
  complete one back under its name (aimv2.engine.checkpointing.recover_interrupted_publish) instead of deleting
  both halves; where the file system swaps atomically the name is never missing at all;
- rollback: resuming an explicit older checkpoint moves the newer ones aside (RUN/checkpoints/abandoned/),
  so the next `auto` continues the new line (aimv2.engine.checkpointing.abandon_newer);
- pruning: a checkpoint directory that Lightning removes (`keep_checkpoints`) leaves its name in one rename
  before it is deleted, so a killed removal never leaves a half-deleted `step=N.ckpt` that still looks
  intact (aimv2.engine.checkpointing.remove_checkpoint, through both directory strategies).

ZeRO directories are DeepSpeed's layout written through AtomicDeepSpeedStrategy around a stubbed
DeepSpeed save (Lightning refuses DeepSpeed on the CPU); DCP directories are written by the real
FSDP2Strategy.save_checkpoint in one process without a process group.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import aimv2.fileio as fileio
from aimv2.engine.checkpointing import (
    ABANDONED,
    AtomicCheckpointIO,
    abandon_newer,
    candidates,
    checkpoint_step,
    newest_intact,
    remove_stale_temporaries,
    resolve_resume,
)

REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """A kill at the edge: nothing after it runs (no `except Exception` catches it)."""


# -- writers: the real save paths of both directory strategies ------------------------------------------
def _deepspeed_save(self, checkpoint, filepath, storage_options=None):  # DeepSpeed's layout, rank 0's files
    (Path(filepath) / "checkpoint").mkdir(parents=True)
    (Path(filepath) / "latest").write_text("checkpoint")
    torch.save(
        {"global_step": checkpoint["global_step"], "module": {}},
        Path(filepath) / "checkpoint" / "mp_rank_00_model_states.pt",
    )


@pytest.fixture
def strategy(request, monkeypatch):
    """The strategy of the `layout` parameter, as one process with no process group."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from aimv2.engine.trainer import AtomicDeepSpeedStrategy, FSDP2Strategy

    if request.param == "dcp":
        return FSDP2Strategy()
    monkeypatch.setattr(DeepSpeedStrategy, "save_checkpoint", _deepspeed_save)
    monkeypatch.setattr(AtomicDeepSpeedStrategy, "is_global_zero", True)
    zero = AtomicDeepSpeedStrategy.__new__(AtomicDeepSpeedStrategy)  # no accelerator needed for saving
    zero.broadcast, zero.barrier = (lambda obj, src=0: obj), (lambda name=None: None)
    return zero


def save(strategy, path: Path, step: int) -> None:
    strategy.save_checkpoint(
        {"state_dict": {"model.w": torch.full((4,), float(step))}, "optimizer_states": [], "global_step": step}, path
    )


LAYOUTS = pytest.mark.parametrize("strategy", ["zero", "dcp"], indirect=True)


def without_exchange(monkeypatch) -> None:
    """The fallback publish (two renames): what file systems without renameat2 RENAME_EXCHANGE get."""
    real = fileio._renameat2
    monkeypatch.setattr(
        fileio,
        "_renameat2",
        lambda src, dst, flags: False if flags == fileio._RENAME_EXCHANGE else real(src, dst, flags),
    )


def kill_between_the_two_renames(monkeypatch, final: Path) -> None:
    real = os.replace

    def replace(src, dst):
        if Path(dst) == final and Path(src).name == f".{final.name}.tmp":  # the old version is aside already
            raise Killed(f"killed before {src} became {dst}")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)


# -- 1. the publish window ------------------------------------------------------------------------------
@LAYOUTS
@pytest.mark.parametrize("start", ["cleanup", "auto"])
def test_a_publish_killed_between_its_two_renames_is_put_back(strategy, start, tmp_path, monkeypatch, caplog):
    ckpts = tmp_path / "run" / "checkpoints"
    save(strategy, ckpts / "step=0000004.ckpt", 4)
    save(strategy, ckpts / "last.ckpt", 4)
    with monkeypatch.context() as patch:
        without_exchange(patch)
        kill_between_the_two_renames(patch, ckpts / "last.ckpt")
        with pytest.raises(Killed):
            save(strategy, ckpts / "last.ckpt", 8)  # e.g. the preemption save of a requeued job
    # The edge: no last.ckpt at all; the step-4 version aside, the complete step-8 one still hidden.
    assert sorted(p.name for p in ckpts.iterdir()) == [".last.ckpt.old", ".last.ckpt.tmp", "step=0000004.ckpt"]
    assert checkpoint_step(ckpts / ".last.ckpt.tmp") == 8
    with caplog.at_level(logging.WARNING, logger="aimv2.engine.checkpointing"):
        if start == "cleanup":  # rank 0's start-up cleanup (pretrain), then every rank resolves
            assert remove_stale_temporaries(ckpts) == [".last.ckpt.old"]
            resumed = resolve_resume("auto", ckpts)
        else:  # every rank resolves `auto` first (pretrain's order), then rank 0 cleans up
            resumed = resolve_resume("auto", ckpts)
            assert remove_stale_temporaries(ckpts) == [".last.ckpt.old"]
    assert resumed == str(ckpts / "last.ckpt") and checkpoint_step(ckpts / "last.ckpt") == 8
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=0000004.ckpt"]
    assert len([r for r in caplog.records if r.name == "aimv2.engine.checkpointing"]) == 1
    assert "put back the new checkpoint (step 8) from .last.ckpt.tmp" in caplog.text


@LAYOUTS
def test_the_previous_version_is_put_back_when_the_new_one_is_not_intact(strategy, tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    save(strategy, ckpts / "last.ckpt", 4)
    with monkeypatch.context() as patch:
        without_exchange(patch)
        kill_between_the_two_renames(patch, ckpts / "last.ckpt")
        with pytest.raises(Killed):
            save(strategy, ckpts / "last.ckpt", 8)
    # Corrupt the new one at the edge (the file its step is read from, cut short).
    inner = ".last.ckpt.tmp/" + (
        "meta.pt" if (ckpts / ".last.ckpt.tmp/meta.pt").exists() else "checkpoint/mp_rank_00_model_states.pt"
    )
    (ckpts / inner).write_bytes((ckpts / inner).read_bytes()[:40])
    assert remove_stale_temporaries(ckpts) == [".last.ckpt.tmp"]
    assert resolve_resume("auto", ckpts) == str(ckpts / "last.ckpt") and checkpoint_step(ckpts / "last.ckpt") == 4


def test_a_dcp_publish_killed_by_sigkill_at_the_edge_is_put_back(tmp_path):
    """The same edge with a real SIGKILL (no handler, no `finally` runs) in a process of its own."""
    script = r"""
import os, signal, sys
from pathlib import Path
import torch
import aimv2.fileio as fileio
from aimv2.checkpoints.dcp import save_dcp_checkpoint
final = Path(sys.argv[1])
real_replace, real_rename = os.replace, fileio._renameat2
def replace(src, dst):
    if Path(dst) == final and final.with_name(f".{final.name}.old").exists():
        os.kill(os.getpid(), signal.SIGKILL)  # between the two renames
    real_replace(src, dst)
fileio._renameat2 = lambda src, dst, flags: False if flags == fileio._RENAME_EXCHANGE else real_rename(src, dst, flags)
fileio.os.replace = replace
for step in (4, 8):
    state = {"state_dict": {"w": torch.full((4,), float(step))}}
    save_dcp_checkpoint(state, {"global_step": step}, final, 0, lambda: None)
"""
    ckpts = tmp_path / "checkpoints"
    done = subprocess.run(
        [sys.executable, "-c", script, str(ckpts / "last.ckpt")], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert sorted(p.name for p in ckpts.iterdir()) == [".last.ckpt.old", ".last.ckpt.tmp"]
    assert remove_stale_temporaries(ckpts) == [".last.ckpt.old"]
    assert resolve_resume("auto", ckpts) == str(ckpts / "last.ckpt") and checkpoint_step(ckpts / "last.ckpt") == 8


@LAYOUTS
def test_where_the_file_system_swaps_atomically_the_name_is_never_missing(strategy, tmp_path, monkeypatch):
    if not fileio._libc_renameat2():
        pytest.skip("no renameat2 in this C library")
    ckpts = tmp_path / "checkpoints"
    save(strategy, ckpts / "last.ckpt", 4)
    probe = [tmp_path / "a", tmp_path / "b"]
    for p in probe:
        p.mkdir()
    if not fileio._renameat2(*probe, fileio._RENAME_EXCHANGE):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    real_replace = os.replace

    def replace(src, dst):
        assert Path(dst) != ckpts / "last.ckpt", "the two-rename fallback ran"
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        raise Killed(f"killed while deleting {path}")

    with monkeypatch.context() as patch:  # killed right after the swap, while the old version is deleted
        patch.setattr(fileio.os, "replace", replace)
        patch.setattr(fileio.shutil, "rmtree", rmtree)
        with pytest.raises(Killed):
            save(strategy, ckpts / "last.ckpt", 8)
    assert checkpoint_step(ckpts / "last.ckpt") == 8 and checkpoint_step(ckpts / ".last.ckpt.tmp") == 4
    assert remove_stale_temporaries(ckpts) == [".last.ckpt.tmp"]
    assert resolve_resume("auto", ckpts) == str(ckpts / "last.ckpt") and checkpoint_step(ckpts / "last.ckpt") == 8


def test_a_new_checkpoint_killed_before_its_publish_began_is_not_promoted(tmp_path):
    """Without `.NAME.old` nothing proves every rank finished the temporary (DeepSpeed's rank 0 writes its
    `latest` tag before the others are done): it is removed, the previous checkpoints stay as they were."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 4}, ckpts / "step=0000004.ckpt")
    (ckpts / ".step=0000008.ckpt.tmp" / "checkpoint").mkdir(parents=True)
    (ckpts / ".step=0000008.ckpt.tmp" / "latest").write_text("checkpoint")
    torch.save({"global_step": 8, "module": {}}, ckpts / ".step=0000008.ckpt.tmp/checkpoint/mp_rank_00_model_states.pt")
    assert resolve_resume("auto", ckpts) == str(ckpts / "step=0000004.ckpt")
    assert remove_stale_temporaries(ckpts) == [".step=0000008.ckpt.tmp"]


# -- 2. rollback ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("last", ["file", "link"])
def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(last, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in (0, 2, 4, 6):
        torch.save({"global_step": step}, ckpts / f"step={step:07d}.ckpt")
    (ckpts / "step=0000008.ckpt").write_bytes(b"PK\x03\x04 cut")  # a corrupt newer one: moved by its name
    if last == "file":
        shutil.copy(ckpts / "step=0000006.ckpt", ckpts / "last.ckpt")
    else:
        (ckpts / "last.ckpt").symlink_to("step=0000006.ckpt")  # Lightning's relative link
    start = resolve_resume(str(ckpts / "step=0000002.ckpt"), ckpts)
    line = abandon_newer(start, ckpts)
    [dest] = (ckpts / ABANDONED).iterdir()
    assert line is not None and "\n" not in line and str(dest) in line and "(step 2)" in line
    assert line.endswith(": last.ckpt, step=0000004.ckpt, step=0000006.ckpt, step=0000008.ckpt")
    assert sorted(p.name for p in dest.iterdir()) == [
        "last.ckpt",
        "step=0000004.ckpt",
        "step=0000006.ckpt",
        "step=0000008.ckpt",
    ]
    assert checkpoint_step(dest / "last.ckpt") == 6  # a link still resolves beside its target
    assert sorted(p.name for p in ckpts.iterdir()) == [ABANDONED, "step=0000000.ckpt", "step=0000002.ckpt"]
    assert newest_intact(ckpts) == ckpts / "step=0000002.ckpt"
    assert resolve_resume("auto", ckpts) == str(ckpts / "step=0000002.ckpt")
    assert remove_stale_temporaries(ckpts) == [] and (ckpts / ABANDONED).is_dir()  # never cleaned away
    assert abandon_newer(start, ckpts) is None  # nothing newer any more


def test_a_rollback_keeps_checkpoints_of_the_same_step_and_the_one_resumed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (2, 4):
        torch.save({"global_step": step}, ckpts / f"step={step:07d}.ckpt")
    shutil.copy(ckpts / "step=0000004.ckpt", ckpts / "last.ckpt")
    assert abandon_newer(ckpts / "last.ckpt", ckpts) is None
    other = tmp_path / "elsewhere.ckpt"  # an explicit checkpoint of another run: same rule
    torch.save({"global_step": 3}, other)
    assert abandon_newer(other, ckpts).endswith(": last.ckpt, step=0000004.ckpt")
    assert [p.name for p in candidates(ckpts)] == ["step=0000002.ckpt"]


def _tiny_pretrain(root: Path, urls: str, *overrides: str):
    from aimv2.config import load_config
    from aimv2.pretraining.pretrain import pretrain

    return pretrain(
        load_config(
            None,
            [
                f"run_dir={root / 'run'}",
                f"data.sources=[{{urls: '{urls}'}}]",
                "model.img_size=28",
                "model.size=debug",
                "data.batch_size=2",
                "data.num_workers=0",
                "data.shuffle_buffer=0",
                "data.tokenizer.max_length=8",
                "optim.warmup_steps=1",
                "trainer.accelerator=cpu",
                "trainer.log_every_n_steps=1",
                "trainer.checkpoint_every_n_steps=2",
                "trainer.keep_checkpoints=5",
                "trainer.progress_bar=false",
                "visualize.every_n_steps=0",
                *overrides,
            ],
        )
    )


def test_a_real_run_resumed_from_an_older_checkpoint_continues_the_new_line(tmp_path, capsys):
    from conftest import write_caption_shards

    urls = write_caption_shards(tmp_path / "shards", n=16, per_shard=8).urls
    run = _tiny_pretrain(tmp_path, urls, "trainer.max_steps=6")
    ckpts = run.checkpoints
    names = {p.name for p in candidates(ckpts)}
    assert {"step=0000002.ckpt", "step=0000004.ckpt", "step=0000006.ckpt", "last.ckpt"} <= names
    capsys.readouterr()
    _tiny_pretrain(tmp_path, urls, "trainer.max_steps=3", f"trainer.resume={ckpts / 'step=0000002.ckpt'}")
    err = [line for line in capsys.readouterr().err.splitlines() if "moved the newer checkpoints" in line]
    [dest] = (ckpts / ABANDONED).iterdir()
    assert len(err) == 1 and str(dest) in err[0]
    assert err[0].endswith(": last.ckpt, step=0000004.ckpt, step=0000006.ckpt")
    assert checkpoint_step(dest / "step=0000006.ckpt") == 6  # nothing deleted
    # The requeue after it (`auto`) continues the new line: step 3, not the abandoned step 6.
    assert resolve_resume("auto", ckpts) == str(ckpts / "last.ckpt") and checkpoint_step(ckpts / "last.ckpt") == 3


# -- 3. pruning -----------------------------------------------------------------------------------------
@LAYOUTS
def test_a_killed_removal_leaves_nothing_under_the_checkpoints_name(strategy, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        save(strategy, ckpts / f"step={step:07d}.ckpt", step)
    trainer, callback = SimpleNamespace(strategy=strategy), ModelCheckpoint(dirpath=ckpts)
    pruned = ckpts / "step=0000002.ckpt"
    keep = {".metadata", "meta.pt", "latest", "mp_rank_00_model_states.pt"}  # what the step is read from

    def rmtree(path, *args, **kwargs):  # the delete gets half-way: the shards go, the index stays, then the kill
        for f in Path(path).rglob("*"):
            if f.is_file() and f.name not in keep:
                f.unlink()
        raise Killed(f"killed while deleting {path}")

    with monkeypatch.context() as patch:
        patch.setattr(fileio.shutil, "rmtree", rmtree)
        with pytest.raises(Killed):
            callback._remove_checkpoint(trainer, str(pruned))  # Lightning's prune: the strategy's removal
    left = ckpts / ".step=0000002.ckpt.removing"
    assert checkpoint_step(left) == 2  # under its old name, `auto` would have taken this half as intact
    assert not pruned.exists() and [p.name for p in candidates(ckpts)] == ["step=0000004.ckpt"]
    assert remove_stale_temporaries(ckpts) == [left.name]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=0000004.ckpt"]
    callback._remove_checkpoint(trainer, str(ckpts / "step=0000004.ckpt"))  # uninterrupted: all gone
    assert list(ckpts.iterdir()) == []


def test_file_checkpoints_and_missing_paths_are_removed_as_before(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, tmp_path / "step=0000001.ckpt")
    io.remove_checkpoint(tmp_path / "step=0000001.ckpt")
    io.remove_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "dir.ckpt").mkdir()
    (tmp_path / "dir.ckpt" / "x").write_text("x")
    io.remove_checkpoint(tmp_path / "dir.ckpt")
    assert list(tmp_path.iterdir()) == []
