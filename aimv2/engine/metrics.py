"""Reading a run's CSV metrics back: what a user wants to know at the end of a run.

`aimv2 report` (aimv2/viz/runs.py) builds on these: curves from `read_metrics`, final values from
`tail_mean`, so the demo's one-line trend and the report agree on what "final" means.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path


def read_metric(metrics_csv: str | Path, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from Lightning's metrics.csv (rows hold some columns only)."""
    return read_metrics(metrics_csv, [name])[name]


def read_metrics(metrics_csv: str | Path, names: list[str] | tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of several metrics in one pass over the file; a missing column gives []."""
    series: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for name in names:
                if row.get(name):
                    series[name].append((int(row["step"]), float(row[name])))
    return series


def tail_mean(values: list[float], window: int = 3) -> float:
    """Mean of the last `window` values (one logged point is noisy); nan when there are none."""
    tail = values[-window:]
    return sum(tail) / len(tail) if tail else math.nan


def loss_trend(metrics_csv: str | Path, window: int = 3) -> str:
    """'image loss 1.02 -> 0.61, text loss 10.7 -> 1.9, skipped 0', each the mean of `window` logged points."""
    series = read_metrics(metrics_csv, ("train/loss_img", "train/loss_text", "data/skipped_samples"))
    parts = []
    for label, key in (("image loss", "train/loss_img"), ("text loss", "train/loss_text")):
        values = [v for _, v in series[key]]
        if values:
            first = sum(values[:window]) / len(values[:window])
            parts.append(f"{label} {first:.3f} -> {tail_mean(values, window):.3f}")
    skipped = series["data/skipped_samples"]
    if skipped:
        parts.append(f"skipped samples {int(skipped[-1][1])}")
    return "losses over the run: " + ", ".join(parts)
