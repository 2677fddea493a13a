"""The ablation's picture: per head kind, grouped bars (tasks x variants) of the mean top-1 over
seeds, error bars of one sample std, every seed as a dot, chance as a dashed tick (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def plot_summary(summary: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aimv2.fileio import atomic_file

    tasks = summary["tasks"]
    kinds = list(summary["summary"])
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(6.0, 1.6 * len(tasks) + 2), 3.6 * len(kinds)),
                             squeeze=False, constrained_layout=True)
    for ax, kind in zip(axes[:, 0], kinds):
        variants = list(summary["summary"][kind])
        width = 0.8 / max(1, len(variants))
        for j, variant in enumerate(variants):
            cells = summary["summary"][kind][variant]
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(tasks))]
            stats = [cells.get(t["name"]) for t in tasks]
            ax.bar([x for x, s in zip(xs, stats) if s], [s["mean"] for s in stats if s], width * 0.92,
                   yerr=[s["std"] for s in stats if s], capsize=2, label=variant, color=f"C{j}", alpha=0.85)
            for x, s in zip(xs, stats):
                if s:
                    seeds = list(s["per_seed"].values())
                    ax.scatter([x] * len(seeds), seeds, s=8, color="black", zorder=3)
        for i, t in enumerate(tasks):
            if t.get("chance"):
                ax.hlines(t["chance"], i - 0.45, i + 0.45, colors="grey", linestyles="dashed", linewidth=1)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([t["name"] + ("\n(named)" if t.get("named") else "\n(unnamed)" if t.get("named") is False
                                         else "") for t in tasks])
        ax.set_ylabel(f"{kind} probe top-1 (%)")
        ax.set_ylim(0, 114)  # room above 100 for the legend: saturated tasks reach the top
        ax.set_yticks(range(0, 101, 20))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncol=len(variants), loc="upper center")
    seeds = ", ".join(map(str, summary["seeds"]))
    fig.suptitle(f"objective ablation: mean ± std over seeds {seeds} (dots: seeds; dashes: chance)", fontsize="medium")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
