"""`aimv2 scaling vlm`: fit `error = A N^-alpha V^-beta + D` to a sweep over LLM size N and visual tokens
V, and say which (N, V) gives the lowest error at an inference budget (prefill cost 2 N (Q + V)).

`scale_vlm` is the one entry point, for the CLI and for other jobs (`aimv2 compress sweep` calls it on its
results file). It reads and validates the sweep here (every mistake a user can fix is a one-line
UserError naming the file, the row and the column), fits and bootstraps in vlm_law, and writes
OUT/fit.json, OUT/frontier.png and OUT/report.md (vlm_report), each atomically.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import numpy as np

from aimv2.errors import UserError
from aimv2.fileio import atomic_write
from aimv2.scaling import vlm_law
from aimv2.scaling.vlm_law import BOUNDS, PARAMS

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
    from aimv2.scaling.vlm_report import plot_frontier, summary_lines, vlm_scaling_markdown

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
