"""Checks before a training run starts, for what would otherwise destroy work or hang:

- `claim_run_dir`: a run never silently replaces another. A run_dir that already holds a run (its
  config.yaml, checkpoints or metrics) is refused unless the new run resumes it (`trainer.resume`
  auto or a path; auto is the default under SLURM) or `trainer.overwrite=true` asks to replace it.
- `check_launch`: GPUs asked for where none is visible, more GPUs than there are, FSDP/DeepSpeed
  without CUDA, or several nodes without a launcher that starts the other nodes' processes (Lightning
  would wait for them forever): one-line errors instead of a raw traceback or a hang.

Both run on the launching process only (global rank 0, or before any rank exists): the other ranks
of a job start from the same command after it passed, or under SLURM/torchrun at the same time.
"""

from __future__ import annotations

import os
import shutil

from aimv2.config import TrainerConfig
from aimv2.engine.checkpointing import under_slurm
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError


def is_launching_process() -> bool:
    """Not a rank > 0 (Lightning's DDP children, torchrun and srun tasks carry their rank in the environment)."""
    return all(int(os.environ.get(key, "0") or 0) == 0 for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


def launched_externally() -> bool:
    """Processes of every node come from a launcher: SLURM's srun or torchrun (TORCHELASTIC_RUN_ID)."""
    return under_slurm() or "TORCHELASTIC_RUN_ID" in os.environ


def claim_run_dir(run: RunDir, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over another (see the module docstring); with `overwrite`, remove the
    old run's config, checkpoints, logs and pictures first, and say so."""
    if not is_launching_process():
        return
    if resume is None:
        resume = "auto" if under_slurm() else "none"
    held = run.held()
    if not held or resume != "none":
        return
    if not overwrite:
        raise UserError(
            f"run_dir {run} already holds a run ({', '.join(held)}): continue it with "
            f"trainer.resume=auto, choose another run_dir=..., or replace it with trainer.overwrite=true"
        )
    for path in run.artefacts:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    print(f"trainer.overwrite=true: removed the previous run in {run} ({', '.join(held)})", flush=True)


def check_launch(t: TrainerConfig) -> None:
    """One-line errors for launches that cannot start here (see the module docstring)."""
    if not is_launching_process():
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    hint = "check the config on this machine with --rehearse"
    if t.strategy in ("fsdp", "deepspeed") and not gpus:
        raise UserError(f"config key 'trainer.strategy': {t.strategy} needs CUDA GPUs and none is visible here; {hint}")
    if str(t.accelerator) in ("gpu", "cuda") and not gpus:
        raise UserError(
            f"config key 'trainer.accelerator': {t.accelerator} asked for, but no CUDA GPU is visible "
            f"here; {hint}, or set trainer.accelerator=cpu"
        )
    wanted = device_count(t.devices)
    if gpus and str(t.accelerator) in ("gpu", "cuda") and wanted and wanted > gpus and not launched_externally():
        raise UserError(f"config key 'trainer.devices': {wanted} GPUs asked for, {gpus} visible here")
    if t.num_nodes > 1 and not launched_externally():
        raise UserError(
            f"config key 'trainer.num_nodes': {t.num_nodes} nodes need a launcher that starts the other "
            f"nodes' processes (sbatch launch/slurm_multinode.sbatch, or torchrun --nnodes); on one "
            f"machine set trainer.num_nodes=1, or {hint}"
        )


def device_count(devices) -> int | None:
    """Devices per node from `trainer.devices` (an int, "8", a list of ids; "auto" or -1: None)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    try:
        count = int(devices)
    except (TypeError, ValueError):
        return None
    return count if count > 0 else None
