"""`aimv2 report RUN_DIR [RUN_DIR ...] [--out DIR]`: one picture of the curves and a one-page summary.

Reads each run's logs/metrics.csv, config.yaml and (when probed) probe/results.json; writes
OUT/curves.png (image loss, text loss, total loss, lr, samples/s, skipped samples; runs overlaid)
and OUT/report.md (final losses, throughput, config differences, probe results): aimv2.viz.report
does the work; this module is the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "curves PNG and Markdown summary of one or more pre-training runs (config differences, probe results)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `aimv2 pretrain` (its run_dir)")
    parser.add_argument(
        "--out",
        help="directory for curves.png and report.md (default: RUN_DIR/report for one run, PARENT/report for several)",
    )


def default_out(runs: list[str]) -> Path:
    """RUN/report for one run; for several, report/ beside the first (e.g. runs/report)."""
    from aimv2.engine.run_dir import RunDir

    first = RunDir(runs[0])
    return first.report if len(runs) == 1 else RunDir(first.root.resolve().parent).report


def run(args: argparse.Namespace) -> int:
    from aimv2.viz.report import write_report

    out = Path(args.out) if args.out else default_out(args.runs)
    written = write_report(args.runs, out)
    print(f"report of {len(args.runs)} run(s): {', '.join(written['names'])}")
    print(f"  curves   {written['curves']}")
    print(f"  summary  {written['markdown']}")
    return 0
