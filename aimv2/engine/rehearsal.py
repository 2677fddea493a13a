"""Rehearsal: run a config as it is, shrunk to the debug size on this machine's CPU for a few steps
with a checkpoint and a resume, so that a config error shows in a minute on a laptop instead of
after hours in a cluster queue.

Kept as configured: strategy (ddp runs for real, on CPU processes with gloo), precision (bf16
autocast runs on the CPU), gradient accumulation, clipping, checkpointing and its retention,
activation checkpointing, compile, the non-finite guard, the data mode and mixture shape (sources,
weights), the tokenizer when it is on this machine, the optimizer and schedule. Shrunk: the model
size, resolution, batch, workers, steps, nodes and devices. What cannot run on a CPU (Lightning's
FSDP and DeepSpeed need CUDA) is checked as far as the CPU allows -- the strategy object, the
precision plugin, the optimizer, and for DeepSpeed a real ZeRO step and checkpoint read back -- and
the rest of the config runs under DDP in its place. The report says which is which.

The jobs (aimv2.pretraining.rehearse, aimv2.compress.rehearse) shrink their own sections and
hand the phases to `run_phases`.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from aimv2.checkpoints import schema
from aimv2.config import TrainerConfig, save_config
from aimv2.engine.launch_checks import device_count
from aimv2.engine.run_dir import RunDir
from aimv2.engine.zero_step import run_zero_check
from aimv2.errors import UserError, one_line
from aimv2.processes import run_with_deadline

GPU_ONLY = ("fsdp", "deepspeed")
PHASE_DEADLINE_S = 900  # a rehearsal phase runs a few debug-size steps: minutes at most, even on two CPU ranks


@dataclass
class Finding:
    area: str
    status: str  # ok | changed | checked | not run | FAILED
    detail: str


@dataclass
class RehearsalReport:
    title: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, area: str, status: str, detail: str) -> None:
        self.findings.append(Finding(area, status, detail))

    @property
    def failed(self) -> bool:
        return any(f.status == "FAILED" for f in self.findings)

    def table(self) -> str:
        width = max([len(f.area) for f in self.findings] + [4])
        lines = [f"rehearsal of {self.title}:"]
        lines += [f"  {f.area:<{width}}  {f.status:<8} {f.detail}" for f in self.findings]
        verdict = (
            "FAILED: fix the lines marked FAILED before submitting"
            if self.failed
            else "passed: everything marked ok/checked ran here; 'changed' lines say what was shrunk or "
            "substituted, 'not run' lines what only the cluster can show"
        )
        return "\n".join(lines + [f"rehearsal {verdict}"])


def shrink_trainer(t: TrainerConfig, steps: int, devices: int | None, report: RehearsalReport) -> TrainerConfig:
    """The trainer section for the rehearsal: the same switches on the CPU, `steps` optimizer steps,
    a checkpoint half-way, one node, at most `devices` (default 2) DDP processes."""
    per_node = device_count(t.devices) or 1
    runs_as = "ddp" if t.strategy in GPU_ONLY else t.strategy
    cap = devices if devices is not None else 2
    n = max(1, min(per_node, cap)) if runs_as == "ddp" or per_node > 1 else 1
    if t.strategy in GPU_ONLY:
        report.add(
            "strategy",
            "changed",
            f"{t.strategy} needs CUDA: the rest of the config runs under ddp here (its own objects are checked below)",
        )
    where = f"{t.num_nodes} node(s) x {t.devices} device(s) on {t.accelerator}"
    how = f"{runs_as}, gloo" if runs_as == "ddp" or n > 1 else runs_as
    report.add(
        "devices",
        "changed" if (t.num_nodes, per_node, t.accelerator) != (1, n, "cpu") else "ok",
        f"{where} -> 1 node x {n} CPU process(es) ({how})",
    )
    return replace(
        t,
        accelerator="cpu",
        devices=n,
        num_nodes=1,
        strategy=runs_as,
        max_steps=steps,
        max_epochs=None,
        checkpoint_every_n_steps=max(1, steps // 2),
        log_every_n_steps=1,
        progress_bar=False,
        resume="none",
        overwrite=True,
        offload=False,
    )  # offload belongs to FSDP/DeepSpeed, which do not run here


def check_gpu_strategy(t: TrainerConfig, report: RehearsalReport, workdir: Path, grad_clip: float) -> None:
    """What the CPU can show of the FSDP and DeepSpeed paths: the Lightning objects build with this
    config, the precision plugin accepts its precision, and for DeepSpeed a real ZeRO step (with the
    config's clipping) whose checkpoint directory reads back as the engine's weights."""
    from aimv2.engine.trainer import build_strategy

    if t.strategy == "fsdp":
        from lightning.pytorch.plugins.precision import FSDPPrecision

        try:
            strategy = build_strategy(t)
            FSDPPrecision(t.precision)
        except Exception as err:  # noqa: BLE001 - any failure to build is the finding
            report.add("fsdp", "FAILED", f"building the FSDP strategy: {one_line(err)}")
            return
        report.add(
            "fsdp",
            "checked",
            f"{type(strategy).__name__}: every transformer block one unit, "
            f"{strategy.sharding_strategy.name}, activation checkpointing "
            f"{'on' if t.activation_checkpointing else 'off'}, cpu_offload {t.offload}; precision plugin "
            f"FSDPPrecision({t.precision}); clipping by the root module's clip_grad_norm_; checkpoints one "
            f"consolidated file, read by load_encoder like DDP's",
        )
        report.add("fsdp", "not run", "Lightning's FSDP needs CUDA (torch's FSDP1 refuses a CPU-only machine)")
    if t.strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            report.add(
                "deepspeed",
                "not run",
                "deepspeed is not installed here: pip install -e '.[deepspeed]' "
                "(the cluster's environment needs it too)",
            )
            return
        from lightning.pytorch.plugins.precision import DeepSpeedPrecision

        try:
            strategy = build_strategy(t, batch_size=1)
            DeepSpeedPrecision(t.precision)
        except Exception as err:  # noqa: BLE001
            report.add("deepspeed", "FAILED", f"building the DeepSpeed strategy: {one_line(err)}")
            return
        zero = strategy.config["zero_optimization"]
        report.add(
            "deepspeed",
            "checked",
            f"{type(strategy).__name__} with zero_optimization {zero}; precision "
            f"plugin DeepSpeedPrecision({t.precision}); clipping inside the engine",
        )
        if t.offload:
            from deepspeed.ops.op_builder import CPUAdamBuilder

            ok = CPUAdamBuilder().is_compatible(verbose=False)
            report.add(
                "deepspeed",
                "checked" if ok else "FAILED",
                "DeepSpeed's CPU Adam (optimizer offload) can be built on this machine"
                if ok
                else "DeepSpeed's CPU Adam cannot be built here (it needs a C++ compiler and torch headers)",
            )
        _zero_step(t.zero_stage, grad_clip, workdir / "zero", report)
        report.add(
            "deepspeed",
            "not run",
            "Lightning's DeepSpeed strategy needs CUDA: a full step through "
            "Lightning, bf16 and multi-rank sharding run only on the cluster",
        )


def _zero_step(stage: int, grad_clip: float, out: Path, report: RehearsalReport) -> None:
    from safetensors.torch import load_file

    from aimv2 import load_encoder

    try:
        directory = run_zero_check(out, img_size=28, stages=(stage,), grad_clip=grad_clip)[stage]
        encoder, _ = load_encoder(directory)
        reference = load_file(out / f"reference_{stage}.safetensors")
        state = encoder.state_dict()
        equal = all(
            torch.equal(state[k.removeprefix("model.encoder.")], v)
            for k, v in reference.items()
            if k.startswith("model.encoder.")
        )
    except Exception as err:  # noqa: BLE001
        report.add("deepspeed", "FAILED", f"ZeRO-{stage} step and checkpoint on the CPU: {one_line(err)}")
        return
    report.add(
        "deepspeed",
        "checked" if equal else "FAILED",
        f"ZeRO-{stage}: one DeepSpeed step on the CPU (gradient_clipping {grad_clip}), its checkpoint "
        f"directory read by load_encoder {'equals' if equal else 'DIFFERS from'} the engine's weights",
    )


def run_phases(
    cfg: Any,
    train: Callable[[Any], Any],
    verb: list[str],
    workdir: Path,
    report: RehearsalReport,
    check_checkpoint: Callable[[Path], str],
    in_process: bool = False,
) -> None:
    """Phase 1: `trainer.max_steps` steps from scratch (a checkpoint half-way and at the end). Phase 2:
    a fresh start that resumes from the half-way checkpoint and finishes; its weights are compared with
    phase 1's. Each phase runs as `python -m aimv2 VERB phase.yaml` (output in phaseN.log; Lightning
    starts the DDP ranks from it), or, with `in_process` and one device, as `train(cfg)` in this
    process (the CLI's one-process rehearsals: no interpreter start per phase, half the time).
    `check_checkpoint(last.ckpt)` reads the result as a user would."""
    steps, run = cfg.trainer.max_steps, RunDir(cfg.run_dir)
    half = run.step_checkpoint(max(1, steps // 2))
    if not _run(cfg, train, verb, workdir / "phase1", report, "train", in_process):
        return
    first = _load_state(run.last_checkpoint)
    report.add(
        "train",
        "ok",
        f"{first['global_step']} optimizer steps, checkpoints {sorted(p.name for p in run.checkpoints.iterdir())}",
    )
    if not half.exists():
        report.add("checkpoint", "FAILED", f"no half-way checkpoint {half.name}")
        return
    resumed = replace(cfg, trainer=replace(cfg.trainer, resume=str(half), overwrite=False))
    if not _run(resumed, train, verb, workdir / "phase2", report, "resume", in_process):
        return
    second = _load_state(run.last_checkpoint)
    weights = schema.model_state(second)
    diff = max(
        (
            (a.float() - weights[k].float()).abs().max().item()
            for k, a in schema.model_state(first).items()
            if torch.is_floating_point(a)
        ),
        default=0.0,
    )
    step = schema.global_step(second)
    report.add(
        "resume",
        "ok" if step == schema.global_step(first) else "FAILED",
        f"from {half.name} to step {step}: weights "
        + (
            "equal the uninterrupted run's bit for bit"
            if diff == 0
            else f"differ from the uninterrupted run's by {diff:.2e}"
        ),
    )
    try:
        report.add("checkpoint", "ok", check_checkpoint(run.last_checkpoint))
    except Exception as err:  # noqa: BLE001
        report.add("checkpoint", "FAILED", f"reading last.ckpt back: {one_line(err)}")


def _run(
    cfg: Any,
    train: Callable[[Any], Any],
    verb: list[str],
    log_stem: Path,
    report: RehearsalReport,
    area: str,
    in_process: bool,
) -> bool:
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.devices > 1 or not in_process:  # Lightning's DDP launcher re-runs the command line per rank
        save_config(cfg, log_stem.with_suffix(".yaml"))
        env = os.environ | {"AIMV2_PROGRESS": "off", "PYTHONWARNINGS": "ignore"}
        done = run_with_deadline(
            [sys.executable, "-m", "aimv2", *verb, str(log_stem.with_suffix(".yaml"))],
            env=env,
            timeout=PHASE_DEADLINE_S,
        )
        log_stem.with_suffix(".log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.hung:
            report.add(
                area,
                "FAILED",
                f"still running after {PHASE_DEADLINE_S} s: a hang (every process's stacks are "
                f"in the log: {log_stem.with_suffix('.log')})",
            )
            return False
        if done.returncode != 0:
            lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
            report.add(
                area,
                "FAILED",
                f"{lines[-1] if lines else 'exit ' + str(done.returncode)} (log: {log_stem.with_suffix('.log')})",
            )
            return False
        return True
    try:
        with restored_process_state():
            train(cfg)
        return True
    except Exception as err:  # noqa: BLE001 - a crash of the rehearsed run is the finding
        log_stem.with_suffix(".log").write_text(traceback.format_exc(), encoding="utf-8")
        report.add(area, "FAILED", f"{one_line(err)} (traceback: {log_stem.with_suffix('.log')})")
        return False


@contextmanager
def restored_process_state() -> Iterator[None]:
    """Run a training in this process and leave nothing of it behind: Lightning's DDP setup writes
    MASTER_PORT, LOCAL_RANK, WORLD_SIZE, ... into os.environ and opens a process group; a later run
    (or a subprocess inheriting the environment) would believe it was launched externally and wait
    for ranks that never come. The environment is restored and the process group destroyed."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def _load_state(path: Path) -> dict:
    """A checkpoint's contents: one file, or a DCP directory (fsdp2) with its model state read back whole."""
    from aimv2.checkpoints.dcp import is_dcp_checkpoint, read_dcp_checkpoint

    if is_dcp_checkpoint(path):
        tensors, meta = read_dcp_checkpoint(path)
        return {**meta, "state_dict": tensors}
    return torch.load(path, map_location="cpu", weights_only=True)


def unreadable(spec: str) -> str | None:
    """Why the shards of `spec` cannot be read on this machine (missing, remote), or None when they can."""
    from aimv2.data.shardlist import REMOTE_PREFIXES, expand_urls

    if not spec or spec == "???":
        return "no shards given"
    try:
        urls = expand_urls(spec, "data")
    except UserError as err:
        return str(err).removeprefix("data: ")
    remote = [u for u in urls if u.startswith(REMOTE_PREFIXES)]
    return f"remote shards ({remote[0]})" if remote else None


def demo_shard_urls(root: Path) -> dict:
    """The offline demo set (aimv2 shards demo), written once under ROOT/demo_data and reused."""
    from aimv2.data.demo import build_demo_shards

    return build_demo_shards(root / "demo_data")


def rehearsal_tokenizer(tok, report: RehearsalReport, key: str, words_stand_in: str | None = None):
    """The config's tokenizer when it is on this machine; else a stand-in, said so: for a missing word
    list `words_stand_in` (the demo set's, when the demo stands in for the shards too) or the offline
    CLIP tokenizer, for a missing tokenizer directory the offline CLIP tokenizer."""
    if tok.kind == "hf" and not (tok.path and Path(tok.path).is_dir()):
        report.add(
            "tokenizer",
            "changed",
            f"{key}.path {tok.path!r} is not a directory here: the offline CLIP "
            "tokenizer stands in (the cluster run needs the directory: "
            "docs/pretraining.md#tokenizer)",
        )
        return replace(tok, kind="clip", path=None)
    if tok.kind == "words" and not (tok.path and Path(tok.path).is_file()):
        stand_in = f"the demo set's word list {words_stand_in}" if words_stand_in else "the offline CLIP tokenizer"
        report.add(
            "tokenizer",
            "changed",
            f"{key}.path: word list {tok.path!r} is not here: {stand_in} stands in (the real run needs its list)",
        )
        return replace(tok, path=words_stand_in) if words_stand_in else replace(tok, kind="clip", path=None)
    where = {"clip": "the offline BPE", "hf": f"from {tok.path}", "words": f"word list {tok.path}"}[tok.kind]
    report.add("tokenizer", "ok", f"{tok.kind} ({where})")
    return tok


def shrink_resolution(img_size: int, patch: int) -> int:
    """A quarter of the resolution, on the patch grid (224 -> 56, 336 -> 84, 448 -> 112): the same
    ratios between stages, a sixteenth of the tokens."""
    return max(2 * patch, round(img_size / 4 / patch) * patch)
