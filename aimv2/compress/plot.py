"""The evaluation plot: caption loss against the number of visual tokens M, and against the
prefill FLOPs per image, one line per run (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def plot_loss_vs_tokens(rows, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aimv2.engine.run_dir import RunDir
    from aimv2.fileio import atomic_file

    series: dict[str, list] = defaultdict(list)
    for r in rows:
        control = ", images shuffled" if r.shuffled else ""
        series[f"{r.compressor} (stage {r.stage}) {RunDir.label_of(r.run)}{control}"].append(r)
    fig, (ax_m, ax_f) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, points in series.items():
        points = sorted(points, key=lambda r: r.num_tokens)
        loss = [r.loss for r in points]
        style = "--" if points[0].shuffled else "-"
        ax_m.plot([r.num_tokens for r in points], loss, style, marker="o", label=label)
        ax_f.plot([r.prefill_gflops for r in points], loss, style, marker="o", label=label)
    ax_m.set_xscale("log", base=2)
    ax_m.set_xlabel("visual tokens M")
    ax_f.set_xscale("log")
    ax_f.set_xlabel("prefill GFLOPs per image, 2 N (Q + M)")
    for ax in (ax_m, ax_f):
        ax.set_ylabel("held-out caption loss (nats / token)")
        ax.grid(True, alpha=0.3)
    ax_m.legend(fontsize="small")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
