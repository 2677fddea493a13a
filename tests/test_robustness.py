"""Fault tolerance of single runs: NaN/inf steps are skipped and counted (and stop the run after
`trainer.max_nonfinite_steps` in a row), never written into a checkpoint; checkpoint files are
written atomically; a corrupt or truncated checkpoint given to resume is a one-line error, and
`trainer.resume=auto` falls back to the newest intact one."""

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from aimv2 import cli
from aimv2.config import load_config
from aimv2.engine.checkpointing import AtomicCheckpointIO, newest_intact, resolve_resume
from aimv2.engine.logs import read_metric
from aimv2.errors import UserError
from aimv2.pretraining.module import AIMv2PretrainModule
from aimv2.pretraining.pretrain import pretrain
from conftest import REPO, write_caption_shards
from fault_helpers import tiny_tokenizer


class PoisonBatches(Callback):
    """Turns the images of the batches at the given steps into NaN; records the weights and AdamW
    state around each optimizer step."""

    def __init__(self, steps):
        self.steps, self.before, self.changed = set(steps), {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["image"].fill_(math.nan)
        self.before = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.moments = {k: v["exp_avg"].clone() for k, v in trainer.optimizers[0].state.items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        weights = any(not torch.equal(p, self.before[n]) for n, p in module.named_parameters())
        moments = any(
            not torch.equal(v["exp_avg"], self.moments[k])
            for k, v in trainer.optimizers[0].state.items()
            if k in self.moments
        )
        self.changed[step] = weights or moments


def config(tmp_path, *extra):
    write_caption_shards(tmp_path / "shards", 24, 12)
    return load_config(
        REPO / "configs/pretrain/debug.yaml",
        [
            *tiny_tokenizer(tmp_path / "tokenizer"),
            f"run_dir={tmp_path / 'run'}",
            f"data.sources=[{{urls: '{tmp_path / 'shards'}/{{00000..00001}}.tar'}}]",
            "model.img_size=28",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=0",
            "data.tokenizer.max_length=8",
            "trainer.max_steps=8",
            "trainer.log_every_n_steps=1",
            "trainer.checkpoint_every_n_steps=2",
            "trainer.keep_checkpoints=-1",
            "trainer.progress_bar=false",
            "visualize.every_n_steps=0",
            "optim.warmup_steps=2",
            *extra,
        ],
    )


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_when_in_a_row(tmp_path):
    # NaN images at steps 1, 3, 4, 5; the third in a row (step 5) stops the run.
    poison = PoisonBatches({1, 3, 4, 5})
    with pytest.raises(UserError, match=r"training stopped at step 5: 3 steps in a row had a NaN/inf loss"):
        pretrain(config(tmp_path, "trainer.max_nonfinite_steps=3"), callbacks=[poison])
    # The poisoned steps left weights and AdamW moments untouched; the others updated them.
    assert poison.changed == {0: True, 1: False, 2: True, 3: False, 4: False}
    run = tmp_path / "run"
    counts = read_metric(run / "logs/metrics.csv", "train/nonfinite_steps")
    assert [int(v) for _, v in counts] == [0, 1, 1, 2, 3]
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step=0000002.ckpt", "step=0000004.ckpt"]  # each right after a poisoned step
    for name in names:
        state = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["aimv2"]["nonfinite_steps"] == 2


def test_a_nonfinite_weight_never_reaches_a_checkpoint():
    module = AIMv2PretrainModule({"size": "debug", "img_size": 28}, {}, {}, vocab_size=64, max_text_len=8)
    state = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    state["state_dict"]["model.decoder.norm.weight"][0] = math.inf
    module.trainer = type("T", (), {"global_step": 7})()  # a stand-in with the one attribute read
    with pytest.raises(RuntimeError, match="refusing to write a checkpoint at step 7: model.decoder.norm.weight"):
        module.on_save_checkpoint(state)


def fake_checkpoint(path, step):
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((64, 64), step)}}, path)


def test_checkpoint_writes_are_atomic(tmp_path):
    target = tmp_path / "ckpts" / "step=0000001.ckpt"
    fake_checkpoint(target, 1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):  # a write that fails half-way ...
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "junk": [torch.ones(1000), Unpicklable()]}, target)
    # ... leaves the previous checkpoint whole and no temporary file behind
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_resume_rejects_corrupt_checkpoints_and_auto_falls_back(tmp_path, capsys, monkeypatch):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (3, 6, 9):
        fake_checkpoint(ckpts / f"step={step:07d}.ckpt", step)
    data = (ckpts / "step=0000009.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated, e.g. killed mid-copy
    (ckpts / "step=0000009.ckpt").write_bytes(b"\0" * len(data))  # overwritten with garbage
    (ckpts / ".step=0000012.ckpt.999.tmp").write_bytes(data)  # a save that never finished its rename
    assert newest_intact(ckpts) == ckpts / "step=0000006.ckpt"
    assert resolve_resume("auto", ckpts) == str(ckpts / "step=0000006.ckpt")
    assert resolve_resume("none", ckpts) is None and resolve_resume(None, ckpts) is None  # not under SLURM
    monkeypatch.setenv("SLURM_NTASKS", "1")  # under SLURM (a batch job step) resume is auto by default
    monkeypatch.setenv("SLURM_JOB_NAME", "aimv2")
    assert resolve_resume(None, ckpts) == str(ckpts / "step=0000006.ckpt")
    monkeypatch.delenv("SLURM_NTASKS")

    for bad in ("last.ckpt", "step=0000009.ckpt"):
        with pytest.raises(UserError, match=rf"trainer.resume: corrupt or truncated checkpoint: .*{bad}"):
            resolve_resume(str(ckpts / bad), ckpts)
    for good in ("step=0000003.ckpt", "step=0000006.ckpt"):
        (ckpts / good).write_bytes(b"not a zip")
    with pytest.raises(UserError, match="no intact checkpoint in .*: last.ckpt .*step=0000003.ckpt"):
        resolve_resume("auto", ckpts)
    assert resolve_resume("auto", tmp_path / "elsewhere") is None  # nothing to resume: a fresh start

    # Through the CLI: one line naming the file, exit status 2, before any data or model is built.
    code = cli.main(
        [
            "pretrain",
            str(REPO / "configs/pretrain/debug.yaml"),
            f"run_dir={tmp_path / 'run'}",
            f"trainer.resume={ckpts / 'last.ckpt'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"aimv2 pretrain: error: trainer.resume: corrupt or truncated checkpoint: {ckpts}/last.ckpt")


def test_zero_checkpoint_directories_are_swapped_in_whole_and_validated(tmp_path, monkeypatch):
    """AtomicDeepSpeedStrategy around DeepSpeed's own save (stubbed: it needs GPUs under Lightning):
    the directory appears under its name only once complete; resume validates ZeRO layouts."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from aimv2.engine.trainer import AtomicDeepSpeedStrategy

    def deepspeed_save(self, checkpoint, filepath, storage_options=None):  # DeepSpeed's layout, every rank
        if checkpoint.get("fail"):
            (Path(filepath) / "checkpoint").mkdir(parents=True)
            raise RuntimeError("node lost mid-save")
        (Path(filepath) / "checkpoint").mkdir(parents=True)
        (Path(filepath) / "latest").write_text("checkpoint")
        torch.save(
            {"global_step": checkpoint["global_step"], "module": {}},
            Path(filepath) / "checkpoint" / "mp_rank_00_model_states.pt",
        )

    monkeypatch.setattr(DeepSpeedStrategy, "save_checkpoint", deepspeed_save)
    monkeypatch.setattr(AtomicDeepSpeedStrategy, "is_global_zero", True)
    strategy = AtomicDeepSpeedStrategy.__new__(AtomicDeepSpeedStrategy)  # no accelerator needed for saving
    strategy.broadcast, strategy.barrier = (lambda obj, src=0: obj), (lambda name=None: None)
    ckpts = tmp_path / "checkpoints"
    strategy.save_checkpoint({"global_step": 4}, ckpts / "last.ckpt")
    strategy.save_checkpoint({"global_step": 8}, ckpts / "last.ckpt")  # replaces the directory whole
    with pytest.raises(RuntimeError, match="node lost"):
        strategy.save_checkpoint({"global_step": 12, "fail": True}, ckpts / "last.ckpt")
    assert sorted(p.name for p in ckpts.iterdir()) == [".last.ckpt.tmp", "last.ckpt"]
    assert resolve_resume("auto", ckpts) == str(ckpts / "last.ckpt")  # the temporary is never a candidate
    assert torch.load(ckpts / "last.ckpt/checkpoint/mp_rank_00_model_states.pt", weights_only=True)["global_step"] == 8
    (ckpts / "last.ckpt/checkpoint/mp_rank_00_model_states.pt").write_bytes(b"cut")
    with pytest.raises(UserError, match="corrupt or truncated checkpoint: .*last.ckpt"):
        resolve_resume(str(ckpts / "last.ckpt"), ckpts)
