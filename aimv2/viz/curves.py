"""The curves PNG of `aimv2 report`: one panel per metric, every run overlaid in its own colour.

matplotlib (Agg backend: no display needed) because curves need what it already does well --
axes with ticks, log scales, legends -- and drawing those by hand in PIL would be code to maintain
for a worse picture. It is imported here only, so training never pays for it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from aimv2.viz.runs import CURVES, Run

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

    from aimv2.viz.grid import save_png

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.6), dpi=dpi)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, CURVES):
        drawn = False
        for i, run in enumerate(runs):
            points = run.series.get(key, [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=colors[i % len(colors)], linewidth=1.4, label=run.name,
                        marker="." if len(points) < 30 else None)
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
        handles, labels = next((a.get_legend_handles_labels() for a in axes.flat if a.get_legend_handles_labels()[0]),
                               ([], []))
    fig.legend(handles, labels, loc="upper center", ncol=min(len(runs), 4), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    # A 256-colour palette keeps line plots sharp and the file small enough to commit.
    image = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    return save_png(image, path)
