"""What an ablation runs: the variants (objective settings), seeds, probe tasks, and where it writes.

Why variants are only objective overrides: the ablation asks what each loss teaches, so everything
else (model, data, optimizer, steps, seed) must be identical between them. The random-init variant
trains nothing: it is the step-0 checkpoint the trained variants of the same seed started from.
Captioning-only trains its encoder bidirectionally (objective.prefix_attention=false), as captioning
baselines such as CapPa do and as every variant is probed: with AIMv2's prefix-causal encoder and no
image loss, most of its tokens would be trained to see only the patches before them.

Why the probe holds part of its train split out (PROBE_DEFAULTS): each probe trains a grid of heads
(lrs x weight decays) and reports the best one; chosen on the split it is scored on, the reported
top-1 is the maximum over the grid of noisy estimates, biased upwards. The heads are chosen on a
class-stratified fifth of each task's train split (aimv2 probe's data.select_fraction) and scored
on its val split.

Run directory:
  plan.json                                 the settings; other pre-training settings are refused
  runs/<variant>/seed<k>/                   an `aimv2 pretrain` run directory (random: none)
  runs/<variant>/seed<k>/probe/<task>/      an `aimv2 probe` run directory per task
  ablation.json, ablation.md, ablation.png  the summary (aimv2.ablation.table, aimv2.ablation.report)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError
from aimv2.fileio import atomic_write

# name -> pre-training overrides; None = no training (the step-0 checkpoint of the same seed).
VARIANTS: dict[str, list[str] | None] = {
    "aimv2": ["objective.alpha=0.4", "objective.text_weight=1.0", "objective.prefix_attention=true"],
    "captioning": ["objective.alpha=0.0", "objective.text_weight=1.0", "objective.prefix_attention=false"],
    "pixel": ["objective.alpha=0.4", "objective.text_weight=0.0", "objective.prefix_attention=true"],
    "random": None,
}
DESCRIPTIONS = {
    "aimv2": "AIMv2: captions + next patches (alpha 0.4, text weight 1), prefix-causal encoder",
    "captioning": "captioning only (alpha 0), bidirectional encoder",
    "pixel": "pixels only (text weight 0), prefix-causal encoder",
    "random": "random init (the step-0 checkpoint, no training)",
}
# Probe settings every ablation probe starts from (before --probe overrides): heads chosen on a held-out
# fifth of the train split, scored on val.
PROBE_DEFAULTS = ["data.select_fraction=0.2"]


def check_variants(variants: list[str]) -> None:
    """Known names, and a trained one among them (random init is a trained variant's step 0)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not any(VARIANTS[v] is not None for v in variants):
        raise UserError(
            "the random-init variant is the step-0 checkpoint of a trained variant: "
            "name at least one of " + ", ".join(v for v, o in VARIANTS.items() if o is not None)
        )


@dataclass(frozen=True)
class Task:
    """A probe task: class-labelled train and val splits (anything `aimv2 probe` reads)."""

    name: str
    train: str
    val: str
    named: bool | None = None  # whether pre-training captions name this attribute (None: unknown)


@dataclass
class AblationPlan:
    out: str
    pretrain_config: str
    pretrain_overrides: list[str]
    probe_config: str | None
    probe_overrides: list[str]
    tasks: list[Task]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))

    def validate(self) -> None:
        check_variants(self.variants)
        if not self.seeds or not self.tasks:
            raise UserError("an ablation needs at least one seed and one probe task")
        if len(set(self.seeds)) != len(self.seeds) or len({t.name for t in self.tasks}) != len(self.tasks):
            raise UserError("seeds and task names must be distinct")

    @property
    def trained(self) -> list[str]:
        return [v for v in self.variants if VARIANTS[v] is not None]

    def run_dir(self, variant: str, seed: int) -> RunDir:
        return RunDir(Path(self.out) / "runs" / variant / f"seed{seed}")

    def init_source(self, seed: int) -> Path:
        """The step-0 checkpoint of a seed: from the first trained variant (all start from the same
        weights: model construction does not depend on the objective)."""
        return self.run_dir(self.trained[0], seed).step_checkpoint(0)

    def record(self) -> None:
        """Write plan.json; refuse an output directory whose pre-training runs were made with other
        settings (they would be reused as if made with these). The fingerprint covers what shapes a
        pre-training run: the config file's content and the overrides. Seeds, variants and tasks may
        be added later; probes whose settings changed are simply redone (aimv2.ablation.run)."""
        path = Path(self.out) / "plan.json"
        config = Path(self.pretrain_config).read_text(encoding="utf-8")
        shaped = json.dumps({"config": config, "overrides": self.pretrain_overrides}, sort_keys=True)
        digest = hashlib.sha256(shaped.encode()).hexdigest()[:16]
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("fingerprint") != digest:
                raise UserError(
                    f"{self.out} holds pre-training runs made with other settings (see {path}); "
                    "choose another --out or delete it"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"fingerprint": digest, **asdict(self)}, indent=1) + "\n")
