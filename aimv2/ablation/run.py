"""Running the ablation: its offline data and every variant's pre-training and probes.

The ablation's offline data: the generated scenes (aimv2.data.scenes) and the demo's digit scans
(aimv2.data.demo), mixed for pre-training; their probe splits become the tasks.

Why both: the digits are real images whose captions name what the probe asks (the digit); the scenes
add attributes that the captions never name (position, size, count) beside ones they do (shape,
colour), which is where the objectives should differ. The captions of both use 58 words, so the
set comes with its word list (`data.tokenizer.kind=words`): CLIP's 49408-way output layer would be
most of every step's cost at this size.

Held out for the pre-training validation loss (data.val): the demo's held-out digits (the probe's val
digits) with their captions, and as many other generated scenes as the probe's val split holds (500 by
default), captioned as the training scenes are; neither is in the pre-training shards.

Run an ablation: pre-train every trained variant for every seed, probe every task, summarize.

Why it is resumable piece by piece: a full ablation is many pre-training runs and many probes, hours
on a CPU at larger scale. A pre-training run that reached its `trainer.max_steps` is not repeated
(an interrupted one continues from its newest checkpoint, `trainer.resume=auto`), a probe whose
results exist for the same checkpoint and probe settings is not repeated (other probe settings, such
as another grid, re-probe the same checkpoints), and the summary is rewritten after every seed, so
an interrupted ablation still leaves a table of what is done.

Every trained run's losses go into the summary too, read back from its metrics.csv (`run_losses`): the
final training losses per term (the mean over the last 10% of logged steps) and the held-out validation
losses (data.val) at every evaluation, the last one being the final.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aimv2.ablation.plan import PROBE_DEFAULTS, VARIANTS, AblationPlan, Task
from aimv2.ablation.report import write_summary
from aimv2.config import load_config
from aimv2.engine.run_dir import RunDir
from aimv2.probe.config import ProbeConfig


def offline_data(
    out: str | Path, scene_counts: tuple[int, int, int] = (6000, 1000, 500), image_size: int = 112
) -> tuple[list[str], list[Task]]:
    """Write (or find) both sets and their word list under `out`; returns the pre-training overrides
    (both sources, one sample in two from each; the word tokenizer; the held-out validation shards of
    both sets, data.val.urls) and the probe tasks: digits, then the scene tasks."""
    from aimv2.data.demo import build_demo_shards
    from aimv2.data.scenes import build_scene_shards
    from aimv2.data.tokenizer import write_vocabulary

    out = Path(out)
    digits = build_demo_shards(out / "digits", image_size=image_size)
    pretrain, train, val = scene_counts
    scenes = build_scene_shards(
        out / "scenes", pretrain=pretrain, probe_train=train, probe_val=val, image_size=image_size, heldout=val
    )
    urls = {"scenes": scenes["pretrain"]["urls"], "digits": digits["pretrain"]["urls"]}
    vocabulary = out / "vocab.txt"
    write_vocabulary((c for u in urls.values() for c in shard_captions(u)), vocabulary)
    overrides = [
        "data.sources=[" + ", ".join(f"{{name: {n}, urls: '{u}'}}" for n, u in urls.items()) + "]",
        "data.tokenizer.kind=words",
        f"data.tokenizer.path='{vocabulary.resolve()}'",
        f"data.val.urls='{scenes['heldout']['urls']}::{digits['heldout']['urls']}'",
    ]
    tasks = [Task("digit", digits["probe_train"]["dir"], digits["probe_val"]["dir"], named=True)]
    tasks += [
        Task(name, entry["train"]["dir"], entry["val"]["dir"], entry["named"])
        for name, entry in scenes["tasks"].items()
    ]
    return overrides, tasks


def shard_captions(urls: str):
    """Every caption (`.txt` member) in the shards of a brace pattern, in order."""
    import tarfile

    from braceexpand import braceexpand

    for url in braceexpand(urls):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8")


def _q(value: object) -> str:
    """A value as a quoted YAML string for a key=value override (paths may hold ':' or braces)."""
    return "'" + str(value).replace("'", "''") + "'"


def _say(message: str) -> None:
    print(f"ablation: {message}", file=sys.stderr, flush=True)


def pretrain_variant(plan: AblationPlan, variant: str, seed: int) -> Path:
    """The variant's final checkpoint for this seed, training (or finishing) it first if needed."""
    from aimv2.engine.checkpointing import InitialCheckpoint, checkpoint_step
    from aimv2.pretraining.pretrain import pretrain

    run = plan.run_dir(variant, seed)
    cfg = load_config(
        plan.pretrain_config,
        [
            *plan.pretrain_overrides,
            *VARIANTS[variant],
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"run_dir={_q(run.root)}",
            "trainer.resume=auto",
        ],
    )
    last = run.last_checkpoint
    if last.is_file() and checkpoint_step(last) >= cfg.trainer.max_steps:
        _say(f"seed {seed}, {variant}: pre-training already done ({last})")
        return last
    _say(f"seed {seed}, {variant}: pre-training {cfg.trainer.max_steps} steps in {run}")
    pretrain(cfg, callbacks=[InitialCheckpoint(run.checkpoints)])
    return last


def probe_task(plan: AblationPlan, variant: str, seed: int, task: Task, checkpoint: Path) -> dict:
    """The best head of each kind on one task, probing first unless results exist for the same
    checkpoint and the same resolved probe config (its config.yaml)."""
    from omegaconf import OmegaConf

    from aimv2.probe.run import run_probe

    out = RunDir(plan.run_dir(variant, seed).probe / task.name)  # a probe run of its own
    cfg = load_config(
        plan.probe_config,
        [
            f"checkpoint={_q(checkpoint)}",
            f"data.train={_q(task.train)}",
            f"data.val={_q(task.val)}",
            f"run_dir={_q(out.root)}",
            *PROBE_DEFAULTS,
            *plan.probe_overrides,
        ],
        schema=ProbeConfig,
    )
    results_file, config_file = out.results_json, out.config
    done = (
        results_file.is_file()
        and config_file.is_file()
        and config_file.read_text(encoding="utf-8") == OmegaConf.to_yaml(OmegaConf.structured(cfg))
    )
    if done:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    else:
        _say(f"seed {seed}, {variant}: probing {task.name}")
        results_file.unlink(missing_ok=True)
        results = run_probe(cfg)
    selected_on = results.get("selected_on", "val")
    chosen = "select_top1" if selected_on == "select" else "top1"  # the top-1 each head was chosen by
    # val_chosen_top1: what choosing on val (the split it is scored on) would have reported, for comparison
    best = {
        kind: {"top1": row["top1"], "lr": row["lr"], "wd": row["wd"]}
        | (
            {
                "select_top1": row["select_top1"],
                "val_chosen_top1": max(r["top1"] for r in results["heads"] if r["head"] == kind),
            }
            if chosen == "select_top1"
            else {}
        )
        for kind, row in results["best_per_kind"].items()
    }
    by_lr: dict[str, dict[str, float]] = {}  # kind -> lr -> best top-1 over weight decays, on the selection split
    for row in results["heads"]:
        cell = by_lr.setdefault(row["head"], {})
        cell[f"{row['lr']:g}"] = max(cell.get(f"{row['lr']:g}", 0.0), row[chosen])
    return {
        "variant": variant,
        "seed": seed,
        "task": task.name,
        "classes": results["classes"],
        "best": best,
        "selected_on": selected_on,
        "top1_by_lr": by_lr,
    }


LOSS_TERMS = {"loss": "total", "loss_img": "image", "loss_text": "caption"}


def run_losses(run: RunDir, tail: float = 0.1) -> dict:
    """A pre-training run's losses from its metrics.csv: {"train": {term: mean over the last `tail` of
    its logged steps}, "train_steps": [first, last] step of that window, "val": {term: value} at the last
    evaluation, "val_step", "val_curve": [{"step", term: value}] for every evaluation}. Terms: total,
    image, caption (a term whose weight is 0 is still logged; the summary marks it untrained)."""
    from aimv2.engine.logs import read_metrics

    if not run.metrics.is_file():
        return {}
    names = [f"{split}/{key}" for split in ("train", "val") for key in LOSS_TERMS]
    series = read_metrics(run.metrics, names)
    out: dict = {"train": {}, "val": {}}
    logged = series["train/loss"]
    if logged:
        window = max(1, round(len(logged) * tail))
        out["train_steps"] = [logged[-window][0] + 1, logged[-1][0] + 1]  # optimizer steps (the csv's step is 0-based)
        for key, term in LOSS_TERMS.items():
            values = [v for _, v in series[f"train/{key}"]][-window:]
            if values:
                out["train"][term] = round(sum(values) / len(values), 4)
    evaluations: dict[int, dict] = {}
    for key, term in LOSS_TERMS.items():
        for step, value in series[f"val/{key}"]:
            evaluations.setdefault(step + 1, {"step": step + 1})[term] = round(value, 4)
    if evaluations:
        out["val_curve"] = [evaluations[s] for s in sorted(evaluations)]
        last = out["val_curve"][-1]
        out["val_step"], out["val"] = last["step"], {t: v for t, v in last.items() if t != "step"}
    return out


def run_ablation(plan: AblationPlan, command: str = "") -> dict:
    """Every variant x seed x task; returns the summary (also written as ablation.{json,md,png})."""
    plan.validate()
    plan.record()
    records: list[dict] = []
    losses: list[dict] = []
    summary: dict = {}
    for seed in plan.seeds:
        for variant in plan.trained:
            checkpoint = pretrain_variant(plan, variant, seed)
            losses.append({"variant": variant, "seed": seed, **run_losses(plan.run_dir(variant, seed))})
            records += [probe_task(plan, variant, seed, task, checkpoint) for task in plan.tasks]
        if "random" in plan.variants:
            records += [probe_task(plan, "random", seed, task, plan.init_source(seed)) for task in plan.tasks]
        summary = write_summary(plan, records, command, losses)
        _say(f"seed {seed} done; summary in {Path(plan.out) / 'ablation.md'}")
    return summary
