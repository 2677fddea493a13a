"""`aimv2 scaling vlm`: fit `error = A N^-alpha V^-beta + D` to a sweep over LLM size N and visual tokens
V, and say which (N, V) gives the lowest error at an inference budget (prefill cost 2 N (Q + V)).

`scale_vlm` is the one entry point, for the CLI and for other jobs (`aimv2 compress sweep` calls it on its
results file). It reads and validates the sweep here (every mistake a user can fix is a one-line
UserError naming the file, the row and the column), fits and bootstraps in vlm_law, and writes
OUT/fit.json, OUT/frontier.png and OUT/report.md (vlm_report), each atomically.

What `aimv2 scaling vlm` shows a reader: OUT/frontier.png (the paper's Figure 1: error against inference
FLOPs, one curve per LLM size, the measured points, and the law's optimal frontier; one panel per Q),
OUT/report.md (the law, its parameters with bootstrap intervals, the optimal (N, V) table, warnings, and
the command that reproduces it) and the few lines printed to the terminal.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import numpy as np

from aimv2.errors import UserError
from aimv2.fileio import atomic_write, markdown_table
from aimv2.scaling import vlm_law
from aimv2.scaling.vlm_law import BOUNDS, PARAMS, VLMLaw, optimal_point

COLUMNS = ("llm_params", "visual_tokens", "error")


def _number(value: object, where: str, column: str) -> float:
    """A finite float, or a UserError naming the row and column (bools and blanks are not numbers)."""
    if isinstance(value, bool) or value is None:
        number = math.nan
    else:
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            number = math.nan
    if not math.isfinite(number):
        shown = "empty" if value is None or (isinstance(value, str) and not value.strip()) else repr(value)
        raise UserError(f"{where}: column '{column}' is not a finite number ({shown})")
    return number


def _read_csv(path: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise UserError(f"{path}: empty file (expected a CSV header with columns {', '.join(COLUMNS)})")
    reader.fieldnames = header
    for column in COLUMNS:
        if column not in header:
            raise UserError(f"{path}: missing column '{column}' (the header has: {', '.join(header)})")
    rows = []
    for i, row in enumerate(reader, start=1):
        rows.append((f"{path} row {i} (line {reader.line_num})", row))
    return rows


def _read_json(path: Path, text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = data["rows"]
    if not isinstance(data, list):
        raise UserError(
            f"{path}: expected a JSON list of objects with keys {', '.join(COLUMNS)} "
            f'(or {{"rows": [...]}}), got {type(data).__name__}'
        )
    rows = []
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(
                f"{path} row {i}: expected an object with keys {', '.join(COLUMNS)}, got {type(row).__name__}"
            )
        for key in COLUMNS:
            if key not in row:
                raise UserError(f"{path} row {i}: missing key '{key}'")
        rows.append((f"{path} row {i}", row))
    return rows


def read_results(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, V, error) from a CSV with columns llm_params, visual_tokens, error (others ignored), or a JSON
    list of objects with those keys (or {"rows": [...]}), validated so the law is identifiable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a CSV or JSON results file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err})") from None
    is_json = path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{")
    rows = _read_json(path, text) if is_json else _read_csv(path, text)
    values = []
    for where, row in rows:
        n, v, e = (_number(row.get(c), where, c) for c in COLUMNS)
        if n <= 0:
            raise UserError(f"{where}: column 'llm_params' must be > 0, got {n:g}")
        if v <= 0:
            raise UserError(f"{where}: column 'visual_tokens' must be > 0, got {v:g}")
        if not 0.0 <= e <= 1.0:
            raise UserError(f"{where}: column 'error' must be in [0, 1] (an error rate, 1 - accuracy), got {e:g}")
        values.append((n, v, e))
    if len(values) < len(PARAMS):
        raise UserError(
            f"{path}: needs at least {len(PARAMS)} rows (one per parameter A, alpha, beta, D), got {len(values)}"
        )
    n, v, e = (np.array(col, dtype=float) for col in zip(*values))
    for name, col, exponent in (("llm_params", n, "alpha"), ("visual_tokens", v, "beta")):
        if len(np.unique(col)) < 2:
            raise UserError(
                f"{path}: column '{name}' takes only one value ({col[0]:g}), so the exponent "
                f"{exponent} cannot be identified: the sweep needs at least two"
            )
    return n, v, e


def command_line(
    results: str | Path, out: str | Path, text_tokens: list[int], budgets: list[float] | None, bootstrap: int, seed: int
) -> str:
    """The `aimv2 scaling vlm ...` line that reproduces a run (for report.md)."""
    parts = [
        "aimv2",
        "scaling",
        "vlm",
        str(results),
        "--out",
        str(out),
        "--text-tokens",
        ",".join(str(q) for q in text_tokens),
    ]
    if budgets is not None:
        parts += ["--budgets", ",".join(f"{b:g}" for b in budgets)]
    parts += ["--bootstrap", str(bootstrap), "--seed", str(seed)]
    return " ".join(shlex.quote(p) for p in parts)


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_options(text_tokens: list[int], budgets: list[float] | None, bootstrap: int) -> None:
    def count(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer() and x >= 0

    if not text_tokens or not all(count(q) for q in text_tokens):
        raise UserError(f"text_tokens must be a non-empty list of integers >= 0, got {list(text_tokens)}")
    if budgets is not None and (not budgets or not all(_positive(b) for b in budgets)):
        raise UserError(f"budgets must be a non-empty list of FLOP counts > 0, got {list(budgets)}")
    if not count(bootstrap):
        raise UserError(f"bootstrap must be an integer >= 0 (0: no uncertainty), got {bootstrap}")


def scale_vlm(
    results: str | Path,
    out: str | Path,
    text_tokens: list[int] = (0, 50),
    budgets: list[float] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict:
    """Fit the law to RESULTS, write OUT/fit.json, OUT/frontier.png, OUT/report.md, print a short summary,
    and return the fit.json content. Budgets default to 12 log-spaced over the sweep's own costs."""

    _check_options(list(text_tokens), budgets, bootstrap)
    text_tokens = [int(q) for q in text_tokens]
    n, v, err = read_results(results)
    law = vlm_law.fit_law(n, v, err)
    n_range, v_range = (float(n.min()), float(n.max())), (float(v.min()), float(v.max()))
    budget_list = [float(b) for b in budgets] if budgets is not None else vlm_law.default_budgets(n, v, text_tokens)
    predicted = law.error(n, v)
    fit = {
        "law": "error = A * llm_params^-alpha * visual_tokens^-beta + D",
        **law.as_dict(),
        "rmse": vlm_law.rmse(law, n, v, err),
        "on_bounds": vlm_law.on_bounds(law),
        "bounds": {name: list(BOUNDS[name]) for name in PARAMS},
        "uncertainty": vlm_law.bootstrap(n, v, err, int(bootstrap), seed),
        "cost": "budget_flops = 2 * llm_params * (text_tokens + visual_tokens)",
        "text_tokens": text_tokens,
        "budgets_flops": budget_list,
        "llm_params_range": list(n_range),
        "visual_tokens_range": list(v_range),
        "optimal": vlm_law.optimal_table(law, budget_list, text_tokens, n_range, v_range),
        "points": [
            {"llm_params": float(a), "visual_tokens": float(b), "error": float(c), "predicted": float(p)}
            for a, b, c, p in zip(n, v, err, predicted)
        ],
        "input": {
            "path": str(results),
            "rows": len(n),
            "command": command_line(results, out, text_tokens, budgets, int(bootstrap), seed),
        },
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "fit.json", json.dumps(fit, indent=2, allow_nan=False) + "\n")
    plot_frontier(law, fit, out / "frontier.png")
    atomic_write(out / "report.md", vlm_scaling_markdown(fit))
    for line in summary_lines(fit, [out / "fit.json", out / "frontier.png", out / "report.md"]):
        print(line)
    return fit


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
