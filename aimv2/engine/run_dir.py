"""The run directory: every path inside a run, named in one place.

Every job that trains through the engine (pre-training, compressor alignment) writes this layout,
and every reader (report, visualize, probe, compress evaluate/export, the ablation) finds things
through it, so a path is spelled once:

    RUN/config.yaml                the resolved config
    RUN/checkpoints/step=N.ckpt    every N steps (the newest `keep_checkpoints`), plus last.ckpt;
                                   step=0000000.ckpt is the weights training started from (when kept)
    RUN/logs/metrics.csv           every logged metric (CSV)
    RUN/logs/tensorboard/          the same for TensorBoard
    RUN/logs/samples/rank*.tsv     with trainer.log_samples: the keys of every consumed sample
    RUN/visualizations/            next-patch prediction grids (aimv2.viz)
    RUN/probe/                     `aimv2 probe`'s default output for a checkpoint of this run
    RUN/report/                    `aimv2 report`'s default output for this run
    RUN/eval/                      `aimv2 compress evaluate`'s default output
    RUN/bundle/                    the rehearsal's compress bundle

An evaluation writes its own directory of the same kind: config.yaml, results.json and results.md
(RUN/probe/ of a probe run, RUN/eval/ of `aimv2 compress evaluate`).

Only pathlib here: commands import it without torch or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
STEP_TEMPLATE = "step={step:07d}"  # Lightning's ModelCheckpoint filename; the files sort by step


def step_checkpoint_name(step: int) -> str:
    """The file name ModelCheckpoint gives the checkpoint of `step` (step=0000042.ckpt)."""
    return STEP_TEMPLATE.format(step=step) + ".ckpt"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created or read by constructing it)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run a checkpoint belongs to (RUN for RUN/checkpoints/NAME, a file or a ZeRO directory), or
        None for a checkpoint kept anywhere else."""
        path = Path(checkpoint)
        return cls(path.parent.parent) if path.parent.name == CHECKPOINTS else None

    @classmethod
    def label_of(cls, checkpoint: str | Path) -> str:
        """A short name for a checkpoint in tables and legends: its run directory's name, else the path."""
        run = cls.of_checkpoint(checkpoint)
        return run.name if run is not None and run.name else str(checkpoint)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def name(self) -> str:
        return self.root.name

    # -- what a run writes --------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_checkpoint_name(step)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        return self.logs / "metrics.csv"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tensorboard"

    @property
    def samples(self) -> Path:
        return self.logs / "samples"

    @property
    def visualizations(self) -> Path:
        return self.root / "visualizations"

    # -- what readers write beside it -----------------------------------------------------------
    @property
    def probe(self) -> Path:
        return self.root / "probe"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    # -- an evaluation's own directory (a probe run, `compress evaluate`'s output) ------------------
    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    # -- a run already here ---------------------------------------------------------------------
    @property
    def artefacts(self) -> tuple[Path, ...]:
        """What a training run writes: removed together when a fresh run replaces it (trainer.overwrite)."""
        return self.config, self.checkpoints, self.logs, self.visualizations

    def held(self) -> list[str]:
        """What of a previous run this directory holds, in words (empty when nothing)."""
        found = []
        if self.config.is_file():
            found.append(self.config.name)
        if self.checkpoints.is_dir() and any(self.checkpoints.iterdir()):
            found.append(f"{sum(1 for _ in self.checkpoints.iterdir())} checkpoint(s)")
        if self.metrics.is_file():
            found.append(self.metrics.relative_to(self.root).as_posix())
        return found
