"""`aimv2 report RUN_DIR [RUN_DIR ...] [--out DIR]`: one picture of the curves and a one-page summary.

Reads each run's logs/metrics.csv, config.yaml and (when probed) probe/results.json; writes
OUT/curves.png (image loss, text loss, total loss, lr, samples/s, skipped samples; runs overlaid)
and OUT/report.md (final losses, throughput, config differences, probe results).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "curves PNG and Markdown summary of one or more pre-training runs (config differences, probe results)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `aimv2 pretrain` (its run_dir)")
    parser.add_argument("--out", help="directory for curves.png and report.md "
                                      "(default: RUN_DIR/report for one run, PARENT/report for several)")


def default_out(runs: list[str]) -> Path:
    """RUN/report for one run; for several, report/ beside the first (e.g. runs/report)."""
    first = Path(runs[0])
    return first / "report" if len(runs) == 1 else first.resolve().parent / "report"


def write_report(runs: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Write curves.png and report.md for `runs` into `out`; returns their paths."""
    from aimv2.fileio import atomic_write
    from aimv2.viz.curves import plot_curves
    from aimv2.viz.runs import load_runs, summary_markdown

    loaded = load_runs(list(runs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(loaded, out / "curves.png")
    markdown = out / "report.md"
    atomic_write(markdown, summary_markdown(loaded, curves.name))
    return {"curves": curves, "markdown": markdown, "names": [r.name for r in loaded]}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_out(args.runs)
    written = write_report(args.runs, out)
    print(f"report of {len(args.runs)} run(s): {', '.join(written['names'])}")
    print(f"  curves   {written['curves']}")
    print(f"  summary  {written['markdown']}")
    return 0
