"""What `aimv2 scaling encoder` shows: OUT/scaling.png (held-out loss against compute, the fitted law
along each size, the compute-optimal frontier) and OUT/report.md (runs, law, held-out check,
recommendations, approximations, the command), both from the fit.json dict so they cannot disagree
with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aimv2.fileio import markdown_table
from aimv2.scaling.encoder_law import EncoderLaw


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.{digits}g}"


def format_params(n) -> str:
    """1234567 -> 1.23M: parameter counts as people say them."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def law_text(p: dict) -> str:
    return f"L(N, D) = {p['E']:.4g} + {p['A']:.4g} / N^{p['a']:.4g} + {p['B']:.4g} / D^{p['b']:.4g}"


def plot_scaling(fit: dict, path: str | Path) -> None:
    """Loss against training FLOPs (log x): one colour per size; filled markers for the fit's runs,
    open ones for held-out runs (with their prediction as x); the law along each size with that size's
    own FLOPs per sample; the compute-optimal frontier (C = k N D with the ladder's median k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aimv2.fileio import atomic_file

    law = EncoderLaw(**fit["params"])
    k = fit["k"]["value"]
    points = fit["points"]
    sizes = list(dict.fromkeys(p["size"] for p in points))
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sizes)}
    budgets = [b["flops"] for b in fit["best"]]
    lo = min(p["flops"] for p in points) / 3
    hi = max([p["flops"] for p in points] + budgets) * 1.5
    grid = np.geomspace(lo, hi, 200)
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for size in sizes:
        mine = [p for p in points if p["size"] == size]
        n = mine[0]["N_encoder"]
        k_size = float(np.median([p["flops"] / (p["N_encoder"] * p["samples"]) for p in mine]))
        # each size's curve from half its shortest run on: further left the D^-b term (fitted on the
        # ladder's own D range only) explodes and would set the axis
        own = grid[grid >= min(p["flops"] for p in mine) / 2]
        ax.plot(own, law.loss(n, own / (k_size * n)), "-", color=colours[size], alpha=0.6, lw=1)
        fitted = [p for p in mine if not p["held_out"]]
        held = [p for p in mine if p["held_out"]]
        ax.scatter(
            [p["flops"] for p in fitted],
            [p["val_loss"] for p in fitted],
            color=colours[size],
            zorder=3,
            label=f"{size} (N={format_params(n)})",
        )
        if held:
            ax.scatter(
                [p["flops"] for p in held],
                [p["val_loss"] for p in held],
                facecolors="none",
                edgecolors=colours[size],
                marker="D",
                s=60,
                zorder=3,
            )
            ax.scatter(
                [p["flops"] for p in held],
                [law.loss(p["N_encoder"], p["samples"]) for p in held],
                color="black",
                marker="x",
                zorder=4,
            )
    if any(p["held_out"] for p in points):
        ax.scatter([], [], facecolors="none", edgecolors="grey", marker="D", label="held out (x: predicted)")
    _, _, l_opt = law.optimal(grid, k)
    if np.all(np.isfinite(l_opt)):
        ax.plot(grid, l_opt, "k--", lw=1.5, label=f"compute-optimal (k={k:.3g})")
    for b in budgets:
        ax.axvline(b, color="grey", ls=":", lw=0.8)
    observed = [p["val_loss"] for p in points]
    span = max(observed) - min(observed)
    ax.set_ylim(min(observed + [float(law.E)]) - 0.1 * span, max(observed) + 0.25 * span)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("held-out AIMv2 loss (val/loss)")
    ax.set_title(law_text(fit["params"]), fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def encoder_scaling_markdown(fit: dict) -> str:
    """report.md: everything a reader needs to trust (or not) the recommendation."""
    p, k, a1 = fit["params"], fit["k"], fit["approach1"]
    lines = [
        "# Encoder scaling law",
        "",
        "Held-out AIMv2 pre-training loss against encoder parameters N and "
        f"training {fit['data_axis']} D (Chinchilla, Hoffmann et al. 2022).",
        "",
        "## Runs",
        "",
    ]
    law = EncoderLaw(**p)
    runs = [
        [
            q["run"],
            q["size"],
            format_params(q["N_encoder"]),
            format_params(q["N_total"]),
            q["step"],
            f"{q['samples']:.4g}",
            f"{q['flops']:.4g}",
            f"{q['val_loss']:.4f}",
            f"{float(law.loss(q['N_encoder'], q['samples'])):.4f}",
            "held out" if q["held_out"] else "fit",
        ]
        for q in fit["points"]
    ]
    lines.append(
        markdown_table(
            ["run", "size", "N encoder", "N total", "step", "samples D", "FLOPs C", "val/loss", "fitted", "role"], runs
        )
    )
    f = fit["fit"]
    lines += [
        "",
        "## Fitted law (approach 3)",
        "",
        f"`{law_text(p)}`",
        "",
        f"- fitted on {f['points']} point(s) of {f['runs']} run(s): Huber loss (delta {f['huber_delta']:g}) on "
        f"log L, L-BFGS from the {f['starts']} best of {f['grid_points']} grid starts; {f['agreeing']} ended at "
        f"the best objective; largest |log residual| {f['max_abs_log_residual']:.2g}",
        f"- k = C / (N D) = {k['value']:.4g} FLOPs per sample per encoder parameter (median over runs; range "
        f"{k['min']:.4g} .. {k['max']:.4g})",
    ]
    if f["at_bound"]:
        lines.append(f"- **exponent(s) {', '.join(f['at_bound'])} ended on a bound: the fit is not trustworthy**")
    if f["points"] <= 5:
        lines.append("- as many points as parameters: the law passes through them exactly; it is not tested by them")
    lines += ["", "## Held-out check", ""]
    if fit["held_out"]:
        lines.append(
            markdown_table(
                ["run", "val/loss", "predicted", "relative error"],
                [
                    [h["run"], f"{h['val_loss']:.4f}", f"{h['predicted']:.4f}", f"{100 * h['rel_error']:+.2f}%"]
                    for h in fit["held_out"]
                ],
            )
        )
    else:
        lines.append("No run held out (`--holdout` given empty): the law is not validated.")
    lines += ["", "## Approach 1 (lower envelope)", ""]
    if a1["identifiable"]:
        lines.append(
            f"log N_opt = {a1['c0']:.4g} + {a1['c1']:.4g} log C through {len(a1['runs'])} run(s) on the "
            f"envelope ({', '.join(a1['runs'])}); with so few points this is a crude cross-check."
        )
    else:
        lines.append(f"Not identifiable: {a1['reason']}.")
    lines += [
        "",
        "## Recommendations",
        "",
        f"Steps at a global batch of {_fmt(fit['global_batch'])} samples (the ladder's).",
        "",
    ]
    best = []
    for b in fit["best"]:
        a3, near, exact = b["approach3"], b["nearest_size"], b["best_size_exact_flops"]
        cells = [
            f"{b['flops']:.3g}",
            format_params(a3["N"]),
            _fmt(a3["samples"]),
            _fmt(a3["steps"]),
            _fmt(a3["loss"], 4),
            format_params(b["approach1_N"]),
        ]
        for row in (near, exact):
            cells += [row["size"], _fmt(row["steps"]), _fmt(row["loss"], 4)] if row else ["-", "-", "-"]
        best.append(cells)
    lines.append(
        markdown_table(
            [
                "budget C",
                "N_opt (approach 3)",
                "samples",
                "steps",
                "predicted loss",
                "N_opt (approach 1)",
                "nearest size",
                "its steps",
                "its loss",
                "best size by exact FLOPs",
                "its steps",
                "its loss",
            ],
            best,
        )
    )
    lines += [
        "",
        "Nearest size: the row of the size table whose encoder is nearest N_opt (log scale), trained on "
        "C / (k N) samples. Best size by exact FLOPs: the row with the lowest predicted loss when its samples "
        "are C / (its own training FLOPs per sample), which counts its decoder and attention exactly.",
        "",
        "## Approximations",
        "",
    ]
    lines += [f"- {a}" for a in fit["approximations"]]
    lines += ["", "## Reproduce", "", "```", fit["command"], "```", ""]
    return "\n".join(lines)
