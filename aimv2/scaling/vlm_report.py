"""What `aimv2 scaling vlm` shows a reader: OUT/frontier.png (the paper's Figure 1: error against inference
FLOPs, one curve per LLM size, the measured points, and the law's optimal frontier; one panel per Q),
OUT/report.md (the law, its parameters with bootstrap intervals, the optimal (N, V) table, warnings, and
the command that reproduces it) and the few lines printed to the terminal."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aimv2.fileio import markdown_table
from aimv2.scaling.vlm_law import PARAMS, VLMLaw, optimal_point

BEYOND = 4.0  # curves run to BEYOND x the largest measured V (dashed there): where more tokens would lead


def _si(x: float) -> str:
    """1.2e9 -> '1.2B' (parameters) in tables and legends."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def plot_frontier(law: VLMLaw, fit: dict, path: str | Path) -> None:
    """Error (y) against prefill FLOPs 2 N (Q + V) (x, log): per measured N a curve of the law over V
    (solid within the measured V range, dashed beyond), the measurements as markers, and the law's best
    error per budget as a thick line (dotted where its N lies outside the sweep's N range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aimv2.fileio import atomic_file

    points = fit["points"]
    n_all = np.array([p["llm_params"] for p in points])
    v_all = np.array([p["visual_tokens"] for p in points])
    e_all = np.array([p["error"] for p in points])
    v_lo, v_hi = fit["visual_tokens_range"]
    n_lo, n_hi = fit["llm_params_range"]
    sizes = np.unique(n_all)
    colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.85, len(sizes)))
    v_in = np.geomspace(v_lo, v_hi, 60)
    v_out = np.geomspace(v_hi, v_hi * BEYOND, 20)
    qs = fit["text_tokens"]
    fig, axes = plt.subplots(1, len(qs), figsize=(5.5 * len(qs), 4.5), constrained_layout=True, squeeze=False)
    for ax, q in zip(axes[0], qs):
        for size, color in zip(sizes, colors):
            ax.plot(2 * size * (q + v_in), law.error(size, v_in), "-", color=color, label=f"N = {_si(size)}")
            ax.plot(2 * size * (q + v_out), law.error(size, v_out), "--", color=color, alpha=0.6)
            mine = n_all == size
            ax.scatter(2 * size * (q + v_all[mine]), e_all[mine], color=color, edgecolor="black", zorder=3, s=28)
        lo = 2 * sizes.min() * (q + v_lo)
        hi = 2 * sizes.max() * (q + v_hi * BEYOND)
        frontier = [optimal_point(law, c, q, v_lo, v_hi) for c in np.geomspace(lo, hi, 120)]
        x = np.array([r["budget_flops"] for r in frontier])
        y = np.array([r["error"] for r in frontier])
        inside = np.array([n_lo * (1 - 1e-9) <= r["llm_params"] <= n_hi * (1 + 1e-9) for r in frontier])
        ax.plot(x, np.where(inside, y, np.nan), "-", color="black", linewidth=3.5, label="optimal (law)", zorder=4)
        ax.plot(
            x, np.where(inside, np.nan, y), ":", color="black", linewidth=2.5, zorder=4, label="optimal, N extrapolated"
        )
        ax.set_xscale("log")
        ax.set_xlabel(f"inference FLOPs per query, 2 N (Q + V), Q = {q}")
        ax.set_ylabel("error")
        ax.set_title(f"Q = {q} text tokens")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(min(e_all.min(), y.min()) - 0.02, max(e_all.max(), law.error(sizes.min(), v_lo)) + 0.02)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"error = {law.A:.4g} N^-{law.alpha:.4g} V^-{law.beta:.4g} + {law.D:.4g}", fontsize="medium")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _interval(fit: dict, name: str) -> str:
    u = fit["uncertainty"]
    if u is None:
        return "not computed (bootstrap 0)"
    return f"{u[name]['p2.5']:.4g} .. {u[name]['p97.5']:.4g} (median {u[name]['p50']:.4g})"


def _warnings(fit: dict) -> list[str]:
    lines = [
        f"the fit sits on a bound: {b}; the box, not the data, sets it (widen the sweep, or read the "
        "law as a description of this range only)"
        for b in fit["on_bounds"]
    ]
    extrapolated = [r for r in fit["optimal"] if r["extrapolated"]]
    if extrapolated:
        n_lo, n_hi = fit["llm_params_range"]
        lines.append(
            f"{len(extrapolated)} of {len(fit['optimal'])} optimal points need an LLM outside the sweep's "
            f"N range {_si(n_lo)} .. {_si(n_hi)} (column 'N extrapolated' of report.md): the law is "
            "extrapolated there"
        )
    return lines


def vlm_scaling_markdown(fit: dict) -> str:
    """report.md: the law, parameters with intervals, rmse, bounds, the optimal table per Q, warnings and
    the command line."""
    u = fit["uncertainty"]
    lines = [
        "# VLM scaling law",
        "",
        f"Fitted to {fit['input']['rows']} rows of `{fit['input']['path']}`:",
        "",
        f"    {fit['law']}",
        "",
        f"    error = {fit['A']:.5g} * N^-{fit['alpha']:.5g} * V^-{fit['beta']:.5g} + {fit['D']:.5g}",
        "",
        f"rmse on the error values: {fit['rmse']:.4g}. N in billions of parameters in the law (A's unit); "
        "llm_params everywhere else are raw counts.",
        "",
        markdown_table(
            ["parameter", "fit", "95% bootstrap interval", "bounds"],
            [
                [name, f"{fit[name]:.5g}", _interval(fit, name), "[{:g}, {:g}]".format(*fit["bounds"][name])]
                for name in PARAMS
            ],
        ),
    ]
    intervals = (
        f"Intervals: 2.5 / 97.5 percentiles over {u['resamples']} fits to rows resampled with "
        f"replacement (seed {u['seed']})."
        if u
        else "No bootstrap (bootstrap 0)."
    )
    method = (
        "Fit: bounded least squares. For each (alpha, beta) the best (A, D) inside the box is solved "
        "exactly (the law is linear in them); (alpha, beta) are scanned on a grid over the box and the best "
        "grid points refined with a bounded local solver. The bounds keep the fit away from the valley "
        "where a free fit slides to alpha, beta -> 0, A -> +inf, D -> -inf."
    )
    lines += ["", intervals, "", method, ""]
    warnings = _warnings(fit)
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    v_lo, v_hi = fit["visual_tokens_range"]
    rule = (
        f"Cost: {fit['cost']}. For a budget C and Q text tokens, N = C / (2 (Q + V)) and the law is "
        "minimized over V: V* = beta Q / (alpha - beta) when alpha > beta and Q > 0, the fewest tokens "
        f"when Q = 0, the most when alpha <= beta; V is an integer kept within the sweep's range "
        f"{v_lo:g} .. {v_hi:g}."
    )
    lines += ["## Inference-optimal (N, V) per budget", "", rule, ""]
    for q in fit["text_tokens"]:
        rows = [
            [
                f"{r['budget_flops']:.3g}",
                _si(r["llm_params"]),
                f"{r['visual_tokens']:g}",
                f"{r['error']:.4f}",
                "yes" if r["extrapolated"] else "no",
            ]
            for r in fit["optimal"]
            if r["text_tokens"] == q
        ]
        header = ["budget (FLOPs)", "LLM params N", "visual tokens V", "error (law)", "N extrapolated"]
        lines += [f"### Q = {q} text tokens", "", markdown_table(header, rows), ""]
    lines += ["![frontier](frontier.png)", "", "Reproduce:", "", f"    {fit['input']['command']}", ""]
    return "\n".join(lines)


def summary_lines(fit: dict, paths: list[Path]) -> list[str]:
    """A few terminal lines: the law with intervals, the optimum per Q at three budgets, warnings, paths."""

    def param(name: str) -> str:
        u = fit["uncertainty"]
        ci = f" [{u[name]['p2.5']:.3g}, {u[name]['p97.5']:.3g}]" if u else ""
        return f"{name}={fit[name]:.4g}{ci}"

    ci = " (95% bootstrap)" if fit["uncertainty"] else ""
    law = (
        f"law: error = A N^-alpha V^-beta + D, {', '.join(param(p) for p in PARAMS)}{ci}, "
        f"rmse {fit['rmse']:.3g} over {fit['input']['rows']} rows"
    )
    lines = [law]
    for q in fit["text_tokens"]:
        rows = [r for r in fit["optimal"] if r["text_tokens"] == q]
        picks = [rows[i] for i in sorted({0, len(rows) // 2, len(rows) - 1})]
        lines.append(
            f"optimal at Q={q}: "
            + "; ".join(
                f"C={r['budget_flops']:.2g}: N={_si(r['llm_params'])} V={r['visual_tokens']:g} "
                f"err={r['error']:.3f}{' (N extrapolated)' if r['extrapolated'] else ''}"
                for r in picks
            )
        )
    lines += [f"warning: {w}" for w in _warnings(fit)]
    lines.append("wrote " + ", ".join(str(p) for p in paths))
    return lines
