"""Reading a run's CSV metrics back: what a user wants to know at the end of a run."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metric(metrics_csv: str | Path, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from Lightning's metrics.csv (rows hold some columns only)."""
    with open(metrics_csv, newline="") as f:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(f) if row.get(name)]


def loss_trend(metrics_csv: str | Path, window: int = 3) -> str:
    """'image loss 1.02 -> 0.61, text loss 10.7 -> 1.9, skipped 0', each the mean of `window` logged points."""
    parts = []
    for label, key in (("image loss", "train/loss_img"), ("text loss", "train/loss_text")):
        values = [v for _, v in read_metric(metrics_csv, key)]
        if values:
            first = sum(values[:window]) / len(values[:window])
            last = sum(values[-window:]) / len(values[-window:])
            parts.append(f"{label} {first:.3f} -> {last:.3f}")
    skipped = read_metric(metrics_csv, "data/skipped_samples")
    if skipped:
        parts.append(f"skipped samples {int(skipped[-1][1])}")
    return "losses over the run: " + ", ".join(parts)
