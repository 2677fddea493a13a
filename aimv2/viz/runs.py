"""What `aimv2 report` knows about a run directory, and the Markdown it writes about several.

A run directory (`aimv2 pretrain`'s run_dir) holds config.yaml, logs/metrics.csv and, once probed,
probe/results.json. Runs are named by the shortest trailing part of their path that tells them
apart (`runs/a/pretrain` and `runs/b/pretrain` become `a/pretrain` and `b/pretrain`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from aimv2.errors import UserError
from aimv2.engine.metrics import read_metrics, tail_mean
from aimv2.engine.run_dir import RunDir

# (metrics.csv column, label): what the curves show and the summary reports.
CURVES = (
    ("train/loss_img", "image loss"),
    ("train/loss_text", "text loss"),
    ("train/loss", "total loss"),
    ("train/lr", "learning rate"),
    ("train/samples_per_sec", "samples/s"),
    ("data/skipped_samples", "skipped samples"),
)
FINAL_WINDOW = 3  # final losses are the mean of this many last logged values
# Shown for a single run, which has nothing to be compared with.
KEY_SETTINGS = ("model.size", "model.img_size", "data.batch_size", "objective.alpha", "objective.text_weight",
                "optim.lr", "optim.warmup_steps", "trainer.max_steps", "trainer.devices", "trainer.precision")


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]  # flattened: {"optim.lr": 0.002, "data.sources.0.urls": "...", ...}
    series: dict[str, list[tuple[int, float]]]
    probe: dict | None  # probe/results.json

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series.get(key, [])]

    @property
    def steps(self) -> int:
        return max((s for points in self.series.values() for s, _ in points), default=-1) + 1


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists -> {"a.b.0.c": leaf}; an empty dict or list stays a leaf."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in items:
        out |= flatten(sub, f"{prefix}.{key}" if prefix else str(key))
    return out


def run_names(paths: list[Path]) -> list[str]:
    """Each run's shortest trailing path parts that no other run shares."""
    parts = [Path(p).resolve().parts for p in paths]
    names = []
    for i, mine in enumerate(parts):
        for depth in range(1, len(mine) + 1):
            if all(other[-depth:] != mine[-depth:] for j, other in enumerate(parts) if j != i):
                break
        names.append("/".join(mine[-depth:]))  # the whole path when the same directory is given twice
    return names


def load_run(path: str | Path, name: str) -> Run:
    run = RunDir(path)
    if not run.root.is_dir():
        raise UserError(f"run directory not found: {run}")
    if not run.metrics.is_file():
        raise UserError(f"{run}: no logs/metrics.csv (not an `aimv2 pretrain` run directory, or no step logged yet)")
    config: dict[str, Any] = {}
    if run.config.is_file():
        try:
            config = flatten(OmegaConf.to_container(OmegaConf.load(run.config)))
        except Exception as err:  # noqa: BLE001 - a damaged config should not hide the curves
            raise UserError(f"{run.config}: not valid YAML ({str(err).splitlines()[0]})") from None
    config.pop("run_dir", None)  # always differs; the directory is listed anyway
    return Run(name, run.root, config, read_metrics(run.metrics, [key for key, _ in CURVES] + ["train/data_wait_s"]),
               find_probe(run))


def find_probe(run: RunDir) -> dict | None:
    """probe/results.json of the run: `aimv2 probe`'s default RUN/probe, or a sibling probe/ directory
    (the demo's layout, runs/demo/{pretrain,probe}) whose results name a checkpoint of this run."""
    sibling = RunDir(run.root.parent).probe
    for results_dir in (run.probe, sibling):
        results = RunDir(results_dir).results_json
        if not results.is_file():
            continue
        try:
            probe = json.loads(results.read_text(encoding="utf-8"))
        except ValueError as err:
            raise UserError(f"{results}: not valid JSON ({err})") from None
        checkpoint = probe.get("checkpoint") if isinstance(probe, dict) else None
        if results_dir == run.probe or (checkpoint and Path(checkpoint).resolve().is_relative_to(run.root.resolve())):
            return probe | {"results_dir": str(results_dir)}
    return None


def load_runs(paths: list[str | Path]) -> list[Run]:
    paths = [Path(p) for p in paths]
    return [load_run(p, n) for p, n in zip(paths, run_names(paths))]


def config_differences(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    """(key, value per run) for every key whose values differ; a key a run lacks shows as None."""
    keys = sorted(set().union(*(r.config for r in runs)))
    rows = [(k, [r.config.get(k) for r in runs]) for k in keys]
    return [(k, vals) for k, vals in rows if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1]


def _num(value: float, digits: int = 4) -> str:
    return "-" if value != value else f"{value:.{digits}g}"  # nan -> "-"


def _cell(value: Any) -> str:
    """A table cell: "-" for a key the run lacks, '""' for an empty string."""
    if value is None:
        return "-"
    return '""' if value == "" else str(value).replace("|", "\\|")


def summary_markdown(runs: list[Run], curves_png: str | None = "curves.png") -> str:
    """The one-page report: runs and their final numbers, config differences, probe results."""
    lines = [f"# aimv2 report: {', '.join(r.name for r in runs)}", ""]
    if curves_png:
        lines += [f"![training curves]({curves_png})", ""]
    lines += ["## Runs", "",
              "| run | directory | steps | image loss | text loss | samples/s (median) | data wait, s/step (median) "
              "| skipped samples | probe top-1 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rate, wait = r.values("train/samples_per_sec"), r.values("train/data_wait_s")
        skipped = r.values("data/skipped_samples")
        top1 = f"{r.probe['best']['top1']:.2f}" if r.probe and "best" in r.probe else "-"
        lines.append(f"| {r.name} | {r.path} | {r.steps} | {_num(tail_mean(r.values('train/loss_img'), FINAL_WINDOW))} "
                     f"| {_num(tail_mean(r.values('train/loss_text'), FINAL_WINDOW))} "
                     f"| {_num(statistics.median(rate) if rate else float('nan'), 3)} "
                     f"| {_num(statistics.median(wait) if wait else float('nan'), 3)} "
                     f"| {int(skipped[-1]) if skipped else '-'} | {top1} |")
    lines += ["", f"Losses are the mean of the last {FINAL_WINDOW} logged values; samples/s counts all ranks; data "
                  "wait is the time rank 0 waited for its next batch between steps (near zero when the data workers "
                  "keep up; raise data.num_workers when it is not).", ""]
    if len(runs) == 1:
        lines += ["## Key settings", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(runs[0].config.get(k))} |" for k in KEY_SETTINGS if k in runs[0].config]
    else:
        diffs = config_differences(runs)
        lines += ["## Config differences", ""]
        if diffs:
            lines += ["| key | " + " | ".join(r.name for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
            lines += [f"| {k} | " + " | ".join(_cell(v) for v in vals) + " |" for k, vals in diffs]
        else:
            lines.append("The runs' configs are identical (apart from run_dir).")
    probed = [r for r in runs if r.probe and "best" in r.probe]
    if probed:
        lines += ["", "## Probe (frozen trunk, best head on val)", "",
                  "| run | head | lr | wd | top-1 | top-5 | mode | epochs | val images | results |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in probed:
            p, b = r.probe, r.probe["best"]
            lines.append(f"| {r.name} | {b['head']} | {b['lr']:g} | {b['wd']:g} | {b['top1']:.2f} | {b['top5']:.2f} "
                         f"| {p.get('mode', '-')} | {p.get('epochs', '-')} | {p.get('val_count', '-')} "
                         f"| {Path(p['results_dir']) / 'results.md'} |")
    return "\n".join(lines) + "\n"
