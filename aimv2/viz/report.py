"""`aimv2 report`'s output: one picture of the curves (aimv2.viz.curves) and a one-page Markdown
summary (aimv2.viz.runs) of one or more run directories."""

from __future__ import annotations

from pathlib import Path

from aimv2.fileio import atomic_write
from aimv2.viz.curves import plot_curves
from aimv2.viz.runs import load_runs, summary_markdown


def write_report(runs: list[str | Path], out: str | Path) -> dict:
    """Write curves.png and report.md for `runs` into `out`; returns their paths and the run names."""
    loaded = load_runs(list(runs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(loaded, out / "curves.png")
    markdown = out / "report.md"
    atomic_write(markdown, summary_markdown(loaded, curves.name))
    return {"curves": curves, "markdown": markdown, "names": [r.name for r in loaded]}
