"""Device and weight-decay invariants of every resume and every optimizer (issue 24: the paths only a
GPU takes).

1. After a resume every optimizer state tensor lives on its parameter's device, with its dtype and
   shape. The probe's head grid keeps its own AdamW moments and reads heads.pt onto the CPU: on a CUDA
   grid they once stayed on the CPU and the first resumed step failed (`m.mul_(b1).add_(g)` across
   devices). Here the grid sits on the `meta` device, so a moment left on the CPU is caught without a
   GPU. Pre-training and compress resume through Lightning (torch's Optimizer.load_state_dict puts
   each state beside its parameter); their real commands' functions are resumed on the CPU and checked
   the same way, together with the restored step count.
2. The decayed parameters are exactly those the unwrapped model decays (trainable matrices except
   position embeddings and the start token). Under FSDP `configure_optimizers` runs after wrapping,
   when every parameter is a flat 1-D shard: the split must have been decided before. Simulated here by
   flattening every parameter in place before `configure_optimizers` (the shape rule alone would then
   decay nothing, which the test checks too).
3. Under DeepSpeed optimizer offload both jobs build DeepSpeed's CPU Adam (ZeRO-Offload refuses a
   torch optimizer) with the groups AdamW would get; a recording stand-in replaces the real one, which
   compiles a C++ extension on first use.

The GPU tests (marker `gpu`, run by benchmarks/gpu_check.sh) take the paths themselves: the paper's
probe config resumed on CUDA trains its next epoch; compress trains and resumes under DeepSpeed ZeRO-2
with optimizer offload and its CPU Adam; compress under FSDP decays the right parameters (on one GPU
FSDP keeps whole parameters (NO_SHARD), with two or more it shards them into flat 1-D views).

Run as a script, this file is the child process of the compress GPU tests:
`python tests/test_device_invariants.py compress OUT.json key=value ...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from aimv2.config import TrainerConfig, load_config
from aimv2.engine.optim import clean_name
from compress_utils import TINY_LM, compress_config, write_encoder_checkpoint
from conftest import REPO, write_caption_shards

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
EXEMPT = ("pos_embed", "start_token")  # the recipe's no-decay names (AIMv2 Table A1), besides 1-D tensors


# -- the invariants ---------------------------------------------------------------------------------
def expected_decay(module: nn.Module) -> set[str]:
    """The recipe's rule on a plain (unwrapped) module: every trainable matrix decays, except the
    position embeddings and the start token."""
    return {
        n
        for n, p in module.named_parameters()
        if p.requires_grad and p.ndim >= 2 and not any(key in n for key in EXEMPT)
    }


def decay_split(optimizer: torch.optim.Optimizer, module: nn.Module) -> tuple[set[str], set[str]]:
    """(decayed, not decayed) parameter names of `module` as the optimizer's groups hold them."""
    names = {id(p): clean_name(n) for n, p in module.named_parameters()}
    split: tuple[set[str], set[str]] = (set(), set())
    for group in optimizer.param_groups:
        split[0 if group["weight_decay"] > 0 else 1].update(names[id(p)] for p in group["params"])
    return split


def misplaced_states(optimizer: torch.optim.Optimizer) -> list[str]:
    """Optimizer state tensors that are not on their parameter's device (or not of its dtype and shape).
    A non-fused, non-capturable AdamW keeps its `step` counter on the CPU by design; fused and
    capturable ones keep it beside the parameter."""
    wrong = []
    for i, group in enumerate(optimizer.param_groups):
        step_with_param = bool(group.get("fused") or group.get("capturable"))
        for j, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    ok = value.device == p.device or not step_with_param
                else:
                    ok = value.device == p.device and value.dtype == p.dtype and value.shape == p.shape
                if not ok:
                    wrong.append(
                        f"group {i} param {j} {key}: {value.device} {value.dtype} {tuple(value.shape)}, "
                        f"parameter {p.device} {p.dtype} {tuple(p.shape)}"
                    )
    return wrong


class OptimizerAtStart(Callback):
    """What the optimizer holds when training starts, after Lightning restored a checkpoint: the
    optimizer's class (DeepSpeed: the one its engine steps), misplaced states, the states and their
    step counts, and (torch optimizers) the decayed and exempt parameter names. Written to `out` as JSON
    by rank 0 when given (the GPU tests' child process)."""

    def __init__(self, out: Path | None = None):
        self.out, self.seen = out, None

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        stepped = engine.basic_optimizer if engine is not None else optimizer
        states = [s for s in stepped.state.values() if s]
        seen = {
            "global_step": trainer.global_step,
            "optimizer": type(stepped).__name__,
            "misplaced": misplaced_states(stepped),
            "states": len(states),
            "state_steps": sorted({float(s["step"]) for s in states if "step" in s}),
        }
        if engine is None:
            decayed, exempt = decay_split(optimizer, pl_module)
            seen |= {"decayed": sorted(decayed), "not_decayed": sorted(exempt)}
        self.seen = seen
        if self.out is not None and trainer.is_global_zero:
            self.out.write_text(json.dumps(seen, indent=1))


def flatten_parameters(module: nn.Module) -> None:
    """What FSDP's sharded parameters look like to `configure_optimizers`: each one a flat 1-D tensor."""
    for p in module.parameters():
        p.data = p.data.reshape(-1)


# -- probe: heads.pt restored beside the parameters -----------------------------------------------
def probe_grid(dtype=torch.float32):
    from aimv2.probe.config import ProbeOptimConfig
    from aimv2.probe.head_grid import HeadGrid, grid_specs

    torch.manual_seed(0)
    cfg = ProbeOptimConfig(lrs=[1e-3, 1e-2], weight_decays=[0.05], grad_clip=1.0)
    return HeadGrid(grid_specs(["linear", "attentive"], cfg.lrs, cfg.weight_decays), 16, 3, cfg, attention_heads=2).to(
        dtype
    )


def probe_batch(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(6, 5, 16, generator=g), torch.randint(0, 3, (6,), generator=g)  # (B, N, D), (B,)


def test_probe_resume_puts_every_moment_on_its_parameters_device(tmp_path):
    from aimv2.probe.head_grid import load_head_state, save_head_state

    grid = probe_grid()
    for i in range(2):
        grid.train_step(*probe_batch(i), total_steps=10, warmup_steps=1)
    save_head_state(grid, tmp_path / "heads.pt", "fp", epoch=1)

    moved = probe_grid().to("meta")  # another device than the file's tensors (the CPU)
    with warnings.catch_warnings():  # torch: copying the weights onto meta is a no-op (the moments are the point)
        warnings.simplefilter("ignore", UserWarning)
        assert load_head_state(moved, tmp_path / "heads.pt", "fp") == 1
    params = {f"{k}.{n}": p for k in moved.kinds for n, p in moved.heads[k].named_parameters()}
    assert moved.optimizer_state().keys() == params.keys()  # every head parameter has its moments back
    for key, state in moved.optimizer_state().items():
        for name in ("m", "v"):
            assert state[name].device == params[key].device, (key, name, state[name].device)
            assert state[name].shape == params[key].shape


def test_probe_resumed_step_equals_the_uninterrupted_one_and_moments_take_the_grids_dtype(tmp_path):
    from aimv2.probe.head_grid import load_head_state, save_head_state

    uninterrupted = probe_grid()
    for i in range(3):
        uninterrupted.train_step(*probe_batch(i), total_steps=10, warmup_steps=1)
    first = probe_grid()
    for i in range(2):
        first.train_step(*probe_batch(i), total_steps=10, warmup_steps=1)
    save_head_state(first, tmp_path / "heads.pt", "fp", epoch=2)

    resumed = probe_grid()
    assert load_head_state(resumed, tmp_path / "heads.pt", "fp") == 2
    resumed.train_step(*probe_batch(2), total_steps=10, warmup_steps=1)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for key, (m, v) in uninterrupted._moments.items():
        torch.testing.assert_close(resumed._moments[key][0], m, rtol=0, atol=0)
        torch.testing.assert_close(resumed._moments[key][1], v, rtol=0, atol=0)

    double = probe_grid(torch.float64)  # the state was saved in fp32: the moments take the parameters' dtype
    assert load_head_state(double, tmp_path / "heads.pt", "fp") == 2
    assert {m.dtype for pair in double._moments.values() for m in pair} == {torch.float64}
    # Copies: stepping the resumed grid leaves the state it was given alone.
    given = torch.load(tmp_path / "heads.pt", map_location="cpu", weights_only=True)["optim"]
    before = {k: (s["m"].clone(), s["v"].clone()) for k, s in given.items()}
    resumed.load_optimizer_state(given)
    resumed.train_step(*probe_batch(3), total_steps=10, warmup_steps=1)
    assert all(torch.equal(given[k]["m"], m) and torch.equal(given[k]["v"], v) for k, (m, v) in before.items())


def test_probe_state_for_another_grid_is_refused(tmp_path):
    grid = probe_grid()
    grid.train_step(*probe_batch(0), total_steps=10, warmup_steps=1)
    state = {k: dict(s) for k, s in grid.optimizer_state().items()}
    key = next(iter(state))
    with pytest.raises(ValueError, match="no such parameter"):
        probe_grid().load_optimizer_state({"mlp.nope": state[key]})
    state[key]["m"] = state[key]["m"][:1]
    with pytest.raises(ValueError, match="shape"):
        probe_grid().load_optimizer_state(state)


# -- pre-training and compress: resumed by their commands' functions --------------------------------
def check_resumed(seen: dict, checkpoint: Path, module_decay: set[str], steps: int) -> None:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["optimizer_states"][0]["state"]
    assert seen["global_step"] == steps
    assert seen["states"] == len(saved) > 0  # every saved state came back (a fresh AdamW has none yet)
    assert seen["state_steps"] == [float(steps)]
    assert seen["misplaced"] == []
    assert set(seen["decayed"]) == module_decay and seen["decayed"]


def test_pretraining_resume_restores_states_beside_their_parameters_and_decays_the_plain_models_set(tmp_path):
    from aimv2.pretraining.pretrain import pretrain

    report = write_caption_shards(tmp_path / "shards", 32, 16)
    base = REPO / "configs/pretrain/debug.yaml"
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"data.sources=[{{urls: '{report.urls}'}}]",
        "model.img_size=28",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        "optim.warmup_steps=1",
        "optim.weight_decay=1e-4",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        "visualize.every_n_steps=0",
    ]
    pretrain(load_config(base, [*overrides, "trainer.max_steps=2"]))
    recorder = OptimizerAtStart()
    pretrain(load_config(base, [*overrides, "trainer.max_steps=3", "trainer.resume=auto"]), callbacks=[recorder])

    expected = expected_decay(pretraining_module())  # the names do not depend on the vocabulary's size
    assert "model.encoder.patch_embed.proj.weight" in expected and "model.encoder.pos_embed" not in expected
    check_resumed(recorder.seen, tmp_path / "run/checkpoints/step=0000002.ckpt", expected, steps=2)


COMPRESS = [
    "stage=2",
    "compressor.kind=pool",
    "compressor.num_tokens=4",
    "optim.weight_decay=1e-4",
    "optim.warmup_steps=1",
    "data.batch_size=4",
    "trainer.checkpoint_every_n_steps=2",
]


def test_compress_resume_restores_states_beside_their_parameters_and_decays_the_plain_modules_set(tmp_path):
    from aimv2.compress.train import build_module, train

    report = write_caption_shards(tmp_path / "shards", 32, 16)
    encoder = write_encoder_checkpoint(tmp_path / "encoder.ckpt")
    train(compress_config(tmp_path, encoder, report.urls, *COMPRESS, "trainer.max_steps=2"))
    recorder = OptimizerAtStart()
    cfg = compress_config(tmp_path, encoder, report.urls, *COMPRESS, "trainer.max_steps=3", "trainer.resume=auto")
    train(cfg, callbacks=[recorder])

    expected = expected_decay(build_module(cfg))  # the frozen encoder has no trainable parameter
    assert {n.split(".")[1] for n in expected} == {"compressor", "lm"}
    check_resumed(recorder.seen, tmp_path / "run/checkpoints/step=0000002.ckpt", expected, steps=2)


# -- FSDP's flat shards, simulated ----------------------------------------------------------------
def pretraining_module():
    from aimv2.pretraining.module import AIMv2PretrainModule

    return AIMv2PretrainModule(
        {"size": "debug", "img_size": 28}, {}, {"lr": 1e-3, "weight_decay": 1e-4}, vocab_size=64, max_text_len=8
    )


def compress_module(tmp_path: Path):
    from aimv2.compress.train import build_module

    encoder = write_encoder_checkpoint(tmp_path / "encoder.ckpt")
    return build_module(compress_config(tmp_path, encoder, "unused", *COMPRESS))


def stand_in_trainer(strategy=None) -> SimpleNamespace:
    """What both modules' configure_optimizers read from a Trainer."""
    return SimpleNamespace(
        strategy=strategy,
        precision="32-true",
        datamodule=None,
        max_epochs=None,
        max_steps=10,
        estimated_stepping_batches=10,
    )


@pytest.mark.parametrize("job", ["pretraining", "compress"])
def test_decay_split_is_the_plain_models_even_when_the_optimizer_sees_flat_shards(tmp_path, job):
    module = pretraining_module() if job == "pretraining" else compress_module(tmp_path)
    expected, trainable = expected_decay(module), {n for n, p in module.named_parameters() if p.requires_grad}
    flatten_parameters(module)  # as FSDP leaves them before configure_optimizers
    assert not expected_decay(module)  # the shapes alone would now exempt every parameter
    module._trainer = stand_in_trainer()
    decayed, exempt = decay_split(module.configure_optimizers()["optimizer"], module)
    assert decayed == expected and len(expected) >= 4
    assert exempt == trainable - expected and exempt


# -- DeepSpeed optimizer offload -------------------------------------------------------------------
class RecordingCPUAdam(torch.optim.Optimizer):
    """Stands in for deepspeed.ops.adam.DeepSpeedCPUAdam (which compiles C++ on first use)."""

    def __init__(self, params, lr, betas, eps, adamw_mode, **kwargs):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.adamw_mode = adamw_mode


def groups_of(optimizer) -> list[tuple]:
    return [(g["initial_lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in optimizer.param_groups]


@pytest.mark.parametrize("job", ["pretraining", "compress"])
@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_offload_builds_deepspeeds_cpu_adam_with_the_adamw_groups(tmp_path, monkeypatch, job, stage):
    import deepspeed.ops.adam

    from aimv2.engine.trainer import build_strategy

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", RecordingCPUAdam)
    module = pretraining_module() if job == "pretraining" else compress_module(tmp_path)
    module._trainer = stand_in_trainer()
    adamw = module.configure_optimizers()["optimizer"]
    assert isinstance(adamw, torch.optim.AdamW)
    strategy = build_strategy(TrainerConfig(strategy="deepspeed", zero_stage=stage, offload=True, accelerator="gpu"))
    module._trainer = stand_in_trainer(strategy)
    offloaded = module.configure_optimizers()["optimizer"]
    assert isinstance(offloaded, RecordingCPUAdam) and offloaded.adamw_mode is True
    assert groups_of(offloaded) == groups_of(adamw)
    if job == "compress":  # the compressor at lr, the LLM at lm_lr_scale x lr, each with a decayed group
        assert len({lr for lr, _, _ in groups_of(offloaded)}) == 2
        assert sum(wd > 0 for _, wd, _ in groups_of(offloaded)) == 2


# -- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@on_gpu
def test_gpu_probe_resumed_on_cuda_trains_the_next_epoch(tmp_path, capsys):
    """The paper's attentive-probe config (augmented mode, accelerator cuda), shrunk: after a run of two
    epochs heads.pt is set back to epoch 1, as a job killed during epoch 2 leaves it; the rerun restores
    heads and moments into the CUDA grid and trains epoch 2 (the restored moments once stayed on the CPU
    and its first step failed)."""
    from aimv2.cli import main
    from test_probe_helpers import write_colour_folders, write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt" / "model.ckpt")
    train, val = write_colour_folders(tmp_path / "train", 16), write_colour_folders(tmp_path / "val", 4, seed=1)
    argv = [
        "probe",
        str(REPO / "configs/probe/imagenet_attentive.yaml"),
        "--checkpoint",
        str(checkpoint),
        "--train",
        str(train),
        "--val",
        str(val),
        "--out",
        str(tmp_path / "probe"),
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "optim.lrs=[1e-3]",
        "optim.weight_decays=[0.05]",
        "data.batch_size=16",
        "data.num_workers=0",
        "progress_bar=false",
    ]
    assert main(argv) == 0
    heads = tmp_path / "probe" / "heads.pt"
    state = torch.load(heads, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["optim"]
    state["epoch"] = 1
    torch.save(state, heads)
    capsys.readouterr()

    assert main(argv) == 0
    assert "resuming head training after epoch 1" in capsys.readouterr().err
    after = torch.load(heads, map_location="cpu", weights_only=True)
    assert after["epoch"] == 2 and int(after["grid"]["step"]) > int(state["grid"]["step"])  # it trained on
    assert all(not torch.equal(after["optim"][k]["m"], state["optim"][k]["m"]) for k in state["optim"])


def compress_child(out: Path, overrides: list[str]) -> tuple[dict, str]:
    """`train` of the compress config with `overrides` in a fresh process (DeepSpeed and FSDP set up
    torch.distributed), recording the optimizer at the start of training."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "compress", str(out), *overrides],
        capture_output=True,
        text=True,
        timeout=480,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads(out.read_text()), done.stdout


def gpu_compress_overrides(tmp_path: Path, devices: int = 1) -> list[str]:
    report = write_caption_shards(tmp_path / "shards", 64, 8)  # 8 shards: enough for two ranks
    encoder = write_encoder_checkpoint(tmp_path / "encoder.ckpt")
    return [
        f"encoder.source={encoder}",
        f"data.train='{report.urls}'",
        "data.val=''",
        f"run_dir={tmp_path / 'run'}",
        "data.num_workers=0",
        "data.shuffle_buffer=64",
        "text.tokenizer.max_length=16",
        *TINY_LM,
        *COMPRESS,
        "trainer.accelerator=gpu",
        f"trainer.devices={devices}",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]


@pytest.mark.gpu
@on_gpu
def test_gpu_compress_trains_and_resumes_under_deepspeed_optimizer_offload_with_cpu_adam(tmp_path):
    """ZeRO-2 with the optimizer offloaded (trainer.offload=true): DeepSpeed refuses any optimizer but
    its CPU ones there, so the run starting at all shows the CPU Adam; resumed, its states (CPU memory,
    beside the fp32 partitions they update) are restored and training goes on."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if not CPUAdamBuilder().is_compatible(verbose=False):
        pytest.skip("DeepSpeed's CPU Adam cannot be built here (it needs a C++ compiler and torch's headers)")
    overrides = [
        *gpu_compress_overrides(tmp_path),
        "trainer.strategy=deepspeed",
        "trainer.zero_stage=2",
        "trainer.offload=true",
    ]
    first, _ = compress_child(tmp_path / "first.json", [*overrides, "trainer.max_steps=3"])
    assert first["optimizer"] == "DeepSpeedCPUAdam" and first["global_step"] == 0
    assert (tmp_path / "run/checkpoints/last.ckpt").is_dir()  # a ZeRO checkpoint directory
    resumed, out = compress_child(tmp_path / "resumed.json", [*overrides, "trainer.max_steps=5", "trainer.resume=auto"])
    assert resumed["optimizer"] == "DeepSpeedCPUAdam" and resumed["global_step"] == 3
    assert resumed["states"] > 0 and resumed["misplaced"] == []
    assert "finished after 5 steps" in out


@pytest.mark.gpu
@on_gpu
def test_gpu_compress_under_fsdp_decays_the_plain_modules_parameters(tmp_path):
    """FSDP wraps the module before configure_optimizers; the decayed set must still be the unwrapped
    module's. With two GPUs or more the parameters the optimizer sees are flat 1-D shards."""
    from aimv2.compress.config import CompressConfig
    from aimv2.compress.train import build_module

    devices = min(torch.cuda.device_count(), 2)
    overrides = [*gpu_compress_overrides(tmp_path, devices), "trainer.strategy=fsdp", "trainer.max_steps=2"]
    seen, out = compress_child(tmp_path / "fsdp.json", overrides)
    plain = build_module(load_config(REPO / "configs/compress/tiny.yaml", overrides, schema=CompressConfig))
    expected = expected_decay(plain)
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert seen["optimizer"] == "AdamW" and seen["misplaced"] == []
    assert set(seen["decayed"]) == expected and set(seen["not_decayed"]) == trainable - expected
    assert "finished after 2 steps" in out


def _compress_child_main(out: Path, overrides: list[str]) -> None:
    from aimv2.compress.config import CompressConfig
    from aimv2.compress.train import train

    train(
        load_config(REPO / "configs/compress/tiny.yaml", overrides, schema=CompressConfig),
        callbacks=[OptimizerAtStart(out)],
    )


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "compress":
    _compress_child_main(Path(sys.argv[2]), sys.argv[3:])
