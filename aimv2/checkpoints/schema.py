"""What a checkpoint of each aimv2 job holds, declared in one place, with its version.

Pre-training and compressor alignment write Lightning checkpoints (a file, a ZeRO directory or a DCP
directory; aimv2.checkpoints.formats reads all three). Lightning owns the top-level keys; the toolkit
relies on the few of them listed in `LIGHTNING_KEYS` and reads them only through `model_state`,
`hyper_parameters` and `global_step`. Everything the toolkit adds lives under one key, "aimv2": the
fields of `FIELDS`, each declared with the job and the code that writes it. `write` is the only way
in (it stamps the version and refuses an undeclared field), `read` the only way out (it checks the
version). The data stream's position is the one piece Lightning files itself: the data module's
`state_dict` (aimv2.engine.stream_resume), under the data module's class name.

Versions (`CHECKPOINT_VERSION`):

- 1: checkpoints written before this module: no version; the logs' row of the checkpoint's step sat at
  the top level as "metrics_row". `read` upgrades them in memory (safe: the same values move).
- 2: every toolkit field under "aimv2", with "version" and "job".

A checkpoint of a newer version than this code knows is refused with one line naming both versions:
its fields may mean something this code would silently get wrong.

The probe's head state (`PROBE/heads.pt`, aimv2.probe.head_grid) is a torch file of its own, versioned by
`HEAD_STATE_VERSION`: heads are cheap to retrain, so another version starts them over instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aimv2.errors import UserError

CHECKPOINT_VERSION = 2
TOOLKIT_KEY = "aimv2"
JOBS = ("pretrain", "compress")


@dataclass(frozen=True)
class Field:
    name: str
    jobs: tuple[str, ...]  # the jobs whose checkpoints hold it
    writer: str  # the code that writes it
    meaning: str


FIELDS: tuple[Field, ...] = (
    Field("version", JOBS, "aimv2.checkpoints.schema", "this schema's version (CHECKPOINT_VERSION)"),
    Field("job", JOBS, "the job's LightningModule", "the job that wrote the checkpoint: pretrain or compress"),
    Field(
        "nonfinite_steps",
        ("pretrain",),
        "aimv2.pretraining.module",
        "optimizer steps skipped so far for a NaN/inf loss or gradient",
    ),
    Field(
        "train_samples",
        ("pretrain",),
        "aimv2.pretraining.validation",
        "training samples seen, summed over ranks (the x axis of the held-out loss)",
    ),
    Field("train_text_tokens", ("pretrain",), "aimv2.pretraining.validation", "caption tokens seen, summed over ranks"),
    Field(
        "train_samples_estimated",
        ("pretrain",),
        "aimv2.pretraining.validation",
        "samples of steps before the count was kept (resumed from a checkpoint without it)",
    ),
    Field(
        "val_row",
        ("pretrain",),
        "aimv2.pretraining.validation",
        "the last held-out loss row [step, metrics], re-logged if the CSV lost it",
    ),
    Field(
        "rank_counters",
        JOBS,
        "aimv2.engine.logs",
        "counters kept per rank and logged as their sum (data/skipped_samples, data/shard_errors), summed over "
        "ranks; restored on rank 0",
    ),
    Field(
        "metrics_row",
        JOBS,
        "aimv2.engine.logs",
        "the CSV row of the checkpoint's step {step, metrics}, restored on resume if the file lacks it",
    ),
)
FIELD_NAMES = frozenset(f.name for f in FIELDS)

LIGHTNING_KEYS = {  # the keys of Lightning's own checkpoint this toolkit reads
    "state_dict": "the module's weights (`model.encoder.*`, `model.decoder.*`) and metric states; compress: "
    "the trained parts only",
    "hyper_parameters": "the job's config as saved by save_hyperparameters (`config`: the resolved YAML)",
    "global_step": "optimizer steps done: the step a resume continues from",
    "optimizer_states": "the optimizer moments (a resume; `aimv2 checkpoint convert --no-optimizer` drops them)",
}

HEAD_STATE_VERSION = 1
HEAD_STATE_KEYS = {
    "version": "HEAD_STATE_VERSION",
    "fingerprint": "a digest of the settings the heads were trained with (features, grid, schedule)",
    "epoch": "epochs of head training done",
    "grid": "the heads' weights (HeadGrid.state_dict)",
    "optim": "their AdamW moments and step, by head name",
}


def write(checkpoint: dict, job: str | None = None, **fields: Any) -> None:
    """Put toolkit fields into `checkpoint["aimv2"]`, stamping the version (and the job when given). An
    undeclared field is a bug in the writer, not a user error: it raises KeyError."""
    unknown = set(fields) - FIELD_NAMES
    if unknown:
        raise KeyError(f"undeclared checkpoint field(s) {sorted(unknown)}: declare them in aimv2.checkpoints.schema")
    if job is not None and job not in JOBS:
        raise KeyError(f"unknown job {job!r} (one of {', '.join(JOBS)})")
    part = checkpoint.setdefault(TOOLKIT_KEY, {})
    part.update(fields)
    part["version"] = CHECKPOINT_VERSION
    if job is not None:
        part["job"] = job


def version_of(checkpoint: dict) -> int:
    """The schema version of a checkpoint dict (Lightning's, or a ZeRO/DCP directory's client state)."""
    part = checkpoint.get(TOOLKIT_KEY)
    if not isinstance(part, dict) or "version" not in part:
        return 1
    return int(part["version"])


def check_version(checkpoint: dict, where: object = "the checkpoint") -> int:
    """The checkpoint's schema version; a UserError naming `where` and both versions when it is newer
    than this code's."""
    version = version_of(checkpoint)
    if version > CHECKPOINT_VERSION:
        raise UserError(
            f"{where}: checkpoint schema version {version} is newer than this aimv2 reads "
            f"(version {CHECKPOINT_VERSION}); upgrade aimv2 to resume or load it"
        )
    return version


def read(checkpoint: dict, where: object = "the checkpoint") -> dict:
    """The toolkit's part of `checkpoint` at CHECKPOINT_VERSION ({} when it holds none). A version 1
    checkpoint is upgraded in place; a newer one is a UserError naming `where` and both versions."""
    version = check_version(checkpoint, where)
    part = checkpoint.setdefault(TOOLKIT_KEY, {})
    if version == 1 and "metrics_row" in checkpoint:
        part.setdefault("metrics_row", checkpoint.pop("metrics_row"))
    return part


def model_state(checkpoint: dict) -> dict:
    """The weights of a Lightning checkpoint ({} when it holds none)."""
    state = checkpoint.get("state_dict")
    return state if isinstance(state, dict) else {}


def hyper_parameters(checkpoint: dict) -> dict:
    """What the job saved with save_hyperparameters ({} when none)."""
    hparams = checkpoint.get("hyper_parameters")
    return hparams if isinstance(hparams, dict) else {}


def global_step(checkpoint: dict) -> int | None:
    """Optimizer steps done, or None for something that is no training checkpoint."""
    step = checkpoint.get("global_step")
    return int(step) if isinstance(step, int) else None


def head_state(fingerprint: str, epoch: int, grid: dict, optim: dict) -> dict:
    """The probe's head-training state, as written to heads.pt."""
    return {"version": HEAD_STATE_VERSION, "fingerprint": fingerprint, "epoch": epoch, "grid": grid, "optim": optim}


def head_state_matches(state: object, fingerprint: str) -> bool:
    """Whether a loaded heads.pt continues the heads of `fingerprint` (same version, same settings)."""
    return (
        isinstance(state, dict)
        and state.get("version", 1) == HEAD_STATE_VERSION
        and state.get("fingerprint") == fingerprint
    )


def describe() -> str:
    """The schema as text: versions, the toolkit's fields by job, the Lightning keys read, the head state."""
    lines = [
        f"checkpoint schema version {CHECKPOINT_VERSION} (pre-training and compressor checkpoints)",
        f"toolkit fields, under checkpoint['{TOOLKIT_KEY}']:",
    ]
    width = max(len(f.name) for f in FIELDS)
    for f in FIELDS:
        lines.append(f"  {f.name:<{width}}  {'/'.join(f.jobs):<17} {f.meaning} (written by {f.writer})")
    lines.append("Lightning keys read:")
    width = max(map(len, LIGHTNING_KEYS))
    lines += [f"  {key:<{width}}  {meaning}" for key, meaning in LIGHTNING_KEYS.items()]
    lines.append(f"probe head state (PROBE/heads.pt) version {HEAD_STATE_VERSION}:")
    width = max(map(len, HEAD_STATE_KEYS))
    lines += [f"  {key:<{width}}  {meaning}" for key, meaning in HEAD_STATE_KEYS.items()]
    return "\n".join(lines)
