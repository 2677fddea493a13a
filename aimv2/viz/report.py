"""`aimv2 report`: run directories read back, their curves drawn, and a one-page Markdown summary.

What `aimv2 report` knows about a run directory, and the Markdown it writes about several.

A run directory (`aimv2 pretrain`'s run_dir) holds config.yaml, logs/metrics.csv and, once probed,
probe/results.json. Runs are named by the shortest trailing part of their path that tells them
apart (`runs/a/pretrain` and `runs/b/pretrain` become `a/pretrain` and `b/pretrain`).

The curves PNG of `aimv2 report`: one panel per metric, every run overlaid in its own colour.

matplotlib (Agg backend: no display needed) because curves need what it already does well --
axes with ticks, log scales, legends -- and drawing those by hand in PIL would be code to maintain
for a worse picture. It is imported here only, so training never pays for it.

`aimv2 report`'s output: one picture of the curves (aimv2.viz.report) and a one-page Markdown
summary (aimv2.viz.report) of one or more run directories.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from aimv2.engine.logs import read_metrics, tail_mean
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError
from aimv2.fileio import atomic_write, markdown_table

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
KEY_SETTINGS = (
    "model.size",
    "model.img_size",
    "data.batch_size",
    "objective.alpha",
    "objective.text_weight",
    "optim.lr",
    "optim.warmup_steps",
    "trainer.max_steps",
    "trainer.devices",
    "trainer.precision",
)


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
    return Run(
        name,
        run.root,
        config,
        read_metrics(run.metrics, [key for key, _ in CURVES] + ["train/data_wait_s"]),
        find_probe(run),
    )


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
    """A config value's table cell: "-" for a key the run lacks, '""' for an empty string."""
    if value is None:
        return "-"
    return '""' if value == "" else str(value)


def summary_markdown(runs: list[Run], curves_png: str | None = "curves.png") -> str:
    """The one-page report: runs and their final numbers, config differences, probe results."""
    lines = [f"# aimv2 report: {', '.join(r.name for r in runs)}", ""]
    if curves_png:
        lines += [f"![training curves]({curves_png})", ""]
    rows = []
    for r in runs:
        rate, wait = r.values("train/samples_per_sec"), r.values("train/data_wait_s")
        skipped = r.values("data/skipped_samples")
        top1 = f"{r.probe['best']['top1']:.2f}" if r.probe and "best" in r.probe else "-"
        rows.append(
            [
                r.name,
                r.path,
                r.steps,
                _num(tail_mean(r.values("train/loss_img"), FINAL_WINDOW)),
                _num(tail_mean(r.values("train/loss_text"), FINAL_WINDOW)),
                _num(statistics.median(rate) if rate else float("nan"), 3),
                _num(statistics.median(wait) if wait else float("nan"), 3),
                int(skipped[-1]) if skipped else "-",
                top1,
            ]
        )
    header = [
        "run",
        "directory",
        "steps",
        "image loss",
        "text loss",
        "samples/s (median)",
        "data wait, s/step (median)",
        "skipped samples",
        "probe top-1",
    ]
    lines += ["## Runs", "", markdown_table(header, rows)]
    lines += [
        "",
        f"Losses are the mean of the last {FINAL_WINDOW} logged values; samples/s counts all ranks; data "
        "wait is the time rank 0 waited for its next batch between steps (near zero when the data workers "
        "keep up; raise data.num_workers when it is not).",
        "",
    ]
    if len(runs) == 1:
        lines += [
            "## Key settings",
            "",
            markdown_table(
                ["key", "value"], [[k, _cell(runs[0].config.get(k))] for k in KEY_SETTINGS if k in runs[0].config]
            ),
        ]
    else:
        diffs = config_differences(runs)
        lines += ["## Config differences", ""]
        if diffs:
            lines.append(
                markdown_table(["key"] + [r.name for r in runs], [[k] + [_cell(v) for v in vals] for k, vals in diffs])
            )
        else:
            lines.append("The runs' configs are identical (apart from run_dir).")
    probed = [r for r in runs if r.probe and "best" in r.probe]
    if probed:
        rows = [
            [
                r.name,
                b["head"],
                f"{b['lr']:g}",
                f"{b['wd']:g}",
                f"{b['top1']:.2f}",
                f"{b['top5']:.2f}",
                p.get("mode", "-"),
                p.get("epochs", "-"),
                p.get("val_count", "-"),
                Path(p["results_dir"]) / "results.md",
            ]
            for r, p, b in ((r, r.probe, r.probe["best"]) for r in probed)
        ]
        header = ["run", "head", "lr", "wd", "top-1", "top-5", "mode", "epochs", "val images", "results"]
        lines += ["", "## Probe (frozen trunk, best head on val)", "", markdown_table(header, rows)]
    return "\n".join(lines) + "\n"


_LOG_SCALE = {"train/loss_img", "train/loss_text", "train/loss"}  # losses fall by orders of magnitude


def _label(value: float, _pos=None, every=(1, 2, 5)) -> str:
    """Tick text: plain numbers (0.2, 0.5, 1, 2, 5, 10), only at 1-2-5 multiples on log axes."""
    if value <= 0:
        return ""
    lead = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if lead in every else ""


def _scale(ax, key: str, values: list[float]) -> None:
    """Log y for losses spanning more than a decade; counts from 0; lr in scientific notation."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if key in _LOG_SCALE and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, p: _label(v, p, (2, 5))))
    elif key == "data/skipped_samples":
        ax.set_ylim(bottom=0, top=max(1.0, max(values) * 1.1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    elif key == "train/lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def plot_curves(runs: list[Run], path: str | Path, dpi: int = 80) -> Path:
    """Write the curves of `runs` to `path` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from aimv2.viz.prediction_grid import save_png

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.6), dpi=dpi)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, CURVES):
        drawn = False
        for i, run in enumerate(runs):
            points = run.series.get(key, [])
            if points:
                steps, values = zip(*points)
                ax.plot(
                    steps,
                    values,
                    color=colors[i % len(colors)],
                    linewidth=1.4,
                    label=run.name,
                    marker="." if len(points) < 30 else None,
                )
                drawn = True
        ax.set_title(label, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            _scale(ax, key, [v for r in runs for _, v in r.series.get(key, [])])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:
        handles, labels = next(
            (a.get_legend_handles_labels() for a in axes.flat if a.get_legend_handles_labels()[0]), ([], [])
        )
    fig.legend(handles, labels, loc="upper center", ncol=min(len(runs), 4), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    # A 256-colour palette keeps line plots sharp and the file small enough to commit.
    image = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    return save_png(image, path)


def write_report(runs: list[str | Path], out: str | Path) -> dict:
    """Write curves.png and report.md for `runs` into `out`; returns their paths and the run names."""
    loaded = load_runs(list(runs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(loaded, out / "curves.png")
    markdown = out / "report.md"
    atomic_write(markdown, summary_markdown(loaded, curves.name))
    return {"curves": curves, "markdown": markdown, "names": [r.name for r in loaded]}
