"""The VLM scaling law `error = A * N^-alpha * V^-beta + D` (N: LLM parameters, V: visual tokens), its
bounded fit, a bootstrap of its parameters, and the inference-optimal (N, V) under the prefill cost
C = 2 N (Q + V) ("Inference Optimal VLMs Need Only One Visual Token but Larger Models", arXiv 2411.03312).

Why bounded: on sweeps whose error is nearly linear in log N and log V (the usual case: a few LLM sizes,
a few token counts), a free least-squares fit slides along the valley alpha, beta -> 0 with A -> +inf and
D -> -inf (A N^-alpha ~ A - A alpha log N), ending near A = +200, D = -200 with meaningless exponents.
The paper's released code therefore grid-searches bounded ranges; so does this, then refines.

How: for fixed (alpha, beta) the law is linear in (A, D), so the best bounded (A, D) has a closed form
(the unconstrained solution if it is inside the box, else the best of the four clipped edges: the
objective is a convex quadratic). The fit scans (alpha, beta) on a grid over the whole box, and refines
the best few grid points with `scipy.optimize.least_squares` (bounded) on that profile; the best wins.
N enters in billions of parameters (N_UNIT), the paper's unit, so that A stays within its box for LLMs from
a million parameters (a CPU test sweep) to tens of billions; inputs and outputs keep raw counts.
Pure numpy/scipy: no torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

PARAMS = ("A", "alpha", "beta", "D")
N_UNIT = 1e9  # the law reads N in billions of parameters (A's value depends on the unit; nothing else does)
# Box of the fit, one (low, high) per parameter. A > 0 strictly in the law; A = 0 (a constant error) is
# the closed edge the solver may reach, and is reported as on-bound. D is an error floor, so in [0, 1].
BOUNDS: dict[str, tuple[float, float]] = {"A": (0.0, 1e6), "alpha": (0.0, 2.0), "beta": (0.0, 2.0), "D": (0.0, 1.0)}
# Exponent grid: dense near 0 where real exponents live (the paper: alpha 0.077, beta 0.015), up to 2.
EXPONENT_GRID = np.concatenate([[0.0], np.geomspace(1e-3, BOUNDS["alpha"][1], 48)])
REFINE_STARTS = 4  # best distinct grid points refined locally


@dataclass(frozen=True)
class VLMLaw:
    """Fitted parameters; `error(N, V)` evaluates the law (broadcasts over arrays)."""

    A: float
    alpha: float
    beta: float
    D: float

    def error(self, n: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
        n, v = np.asarray(n, dtype=float), np.asarray(v, dtype=float)
        return self.A * np.exp(-self.alpha * np.log(n / N_UNIT) - self.beta * np.log(v)) + self.D

    def as_dict(self) -> dict[str, float]:
        return {"A": self.A, "alpha": self.alpha, "beta": self.beta, "D": self.D}


def _best_amplitude_and_floor(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of x (G, n): the (A, D) in BOUNDS minimizing sum (A x + D - y)^2, and that sum.

    The box optimum of a convex quadratic is the free optimum when feasible, else on an edge, where it is
    the 1-D optimum clipped to the edge: so five candidates cover it. x is rescaled per row (its values
    span 1e-20 .. 1 for large N) and A's bound with it, so the arithmetic stays well conditioned.
    """
    scale = x.max(axis=1, keepdims=True)
    xs = x / scale
    a_hi = BOUNDS["A"][1] * scale[:, 0]
    d_lo, d_hi = BOUNDS["D"]
    mx, my = xs.mean(axis=1), y.mean()
    sxx = ((xs - mx[:, None]) ** 2).mean(axis=1)
    sxy = ((xs - mx[:, None]) * (y - my)).mean(axis=1)
    x2 = (xs * xs).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a_free = np.where(sxx > 1e-14, sxy / sxx, np.nan)
        d_free = my - a_free * mx
        free_ok = (a_free >= 0) & (a_free <= a_hi) & (d_free >= d_lo) & (d_free <= d_hi)
        cands = [
            (np.where(free_ok, a_free, 0.0), np.where(free_ok, d_free, d_lo), free_ok),
            (np.zeros_like(mx), np.full_like(mx, np.clip(my, d_lo, d_hi)), None),
            (a_hi, np.clip(my - a_hi * mx, d_lo, d_hi), None),
            (np.clip((xs * (y - d_lo)).mean(axis=1) / x2, 0.0, a_hi), np.full_like(mx, d_lo), None),
            (np.clip((xs * (y - d_hi)).mean(axis=1) / x2, 0.0, a_hi), np.full_like(mx, d_hi), None),
        ]
    best_a, best_d, best_sse = np.zeros_like(mx), np.zeros_like(mx), np.full_like(mx, np.inf)
    for a, d, ok in cands:
        sse = ((a[:, None] * xs + d[:, None] - y) ** 2).sum(axis=1)
        if ok is not None:
            sse = np.where(ok, sse, np.inf)
        better = sse < best_sse
        best_a, best_d = np.where(better, a, best_a), np.where(better, d, best_d)
        best_sse = np.where(better, sse, best_sse)
    return best_a / scale[:, 0], best_d, best_sse


def _profile(exponents: np.ndarray, log_n: np.ndarray, log_v: np.ndarray, y: np.ndarray):
    """(A, D, sse) at each (alpha, beta) row of `exponents` (G, 2)."""
    x = np.exp(-exponents[:, :1] * log_n - exponents[:, 1:] * log_v)  # (G, n)
    return _best_amplitude_and_floor(x, y)


def fit_law(n: np.ndarray, v: np.ndarray, error: np.ndarray, starts: int = REFINE_STARTS) -> VLMLaw:
    """Least-squares fit of the law on the error values within BOUNDS (grid scan over the exponents, then
    bounded local refinement of the best `starts` distinct grid points; the best result wins)."""
    log_n, log_v, y = np.log(np.asarray(n, float) / N_UNIT), np.log(np.asarray(v, float)), np.asarray(error, float)
    grid = np.array(np.meshgrid(EXPONENT_GRID, EXPONENT_GRID, indexing="ij")).reshape(2, -1).T  # (G, 2)
    _, _, sse = _profile(grid, log_n, log_v, y)
    order = np.argsort(sse, kind="stable")
    chosen: list[np.ndarray] = []
    for i in order:  # distinct starts: skip grid neighbours of an already chosen one
        if all(np.abs(grid[i] - s).max() > 0.05 for s in chosen):
            chosen.append(grid[i])
        if len(chosen) == starts:
            break

    def residuals(p: np.ndarray) -> np.ndarray:
        a, d, _ = _profile(p[None, :], log_n, log_v, y)
        return a[0] * np.exp(-p[0] * log_n - p[1] * log_v) + d[0] - y

    lo = [BOUNDS["alpha"][0], BOUNDS["beta"][0]]
    hi = [BOUNDS["alpha"][1], BOUNDS["beta"][1]]
    best_p, best_cost = grid[order[0]], float(sse[order[0]])
    for start in chosen:
        res = least_squares(
            residuals,
            start,
            bounds=(lo, hi),
            method="trf",
            x_scale=0.1,
            xtol=1e-12,
            ftol=1e-12,
            gtol=1e-12,
            max_nfev=200,
        )
        cost = float((res.fun**2).sum())
        if cost < best_cost:
            best_p, best_cost = res.x, cost
    a, d, _ = _profile(np.asarray(best_p)[None, :], log_n, log_v, y)
    return VLMLaw(A=float(a[0]), alpha=float(best_p[0]), beta=float(best_p[1]), D=float(d[0]))


def rmse(law: VLMLaw, n: np.ndarray, v: np.ndarray, error: np.ndarray) -> float:
    return float(np.sqrt(np.mean((law.error(n, v) - np.asarray(error, float)) ** 2)))


def on_bounds(law: VLMLaw) -> list[str]:
    """Parameters that sit on an edge of BOUNDS (within a relative 1e-6 of the range; for A's upper edge,
    of the value): a fit there is set by the box, not the data, so it is reported, not trusted."""
    found = []
    for name, value in law.as_dict().items():
        low, high = BOUNDS[name]
        if value <= low + 1e-6 * min(high - low, 1.0):
            found.append(f"{name} = {value:.4g} on its lower bound {low:g}")
        elif value >= high * (1 - 1e-6):
            found.append(f"{name} = {value:.4g} on its upper bound {high:g}")
    return found


def bootstrap(n: np.ndarray, v: np.ndarray, error: np.ndarray, resamples: int, seed: int) -> dict | None:
    """Percentiles 2.5 / 50 / 97.5 of each parameter over fits to rows resampled with replacement.

    A resample left with a single N or a single V cannot identify that exponent: it is drawn again
    (up to 20 times, then kept). Each refit refines 2 starts, not REFINE_STARTS (the spread, not the last
    digit, is wanted; 200 resamples take seconds). None when resamples == 0."""
    if resamples <= 0:
        return None
    rng = np.random.default_rng(seed)
    n, v, error = (np.asarray(a, float) for a in (n, v, error))
    fits = []
    for _ in range(resamples):
        for _attempt in range(20):
            idx = rng.integers(0, len(n), len(n))
            if len(np.unique(n[idx])) > 1 and len(np.unique(v[idx])) > 1:
                break
        law = fit_law(n[idx], v[idx], error[idx], starts=2)
        fits.append([law.A, law.alpha, law.beta, law.D])
    table = np.percentile(np.array(fits), [2.5, 50.0, 97.5], axis=0)  # (3, 4)
    out: dict = {
        name: {"p2.5": float(table[0, j]), "p50": float(table[1, j]), "p97.5": float(table[2, j])}
        for j, name in enumerate(PARAMS)
    }
    out["resamples"] = resamples
    out["seed"] = seed
    return out


def continuous_optimal_tokens(law: VLMLaw, q: float, v_low: float, v_high: float) -> float:
    """The V minimizing the law at a fixed budget C (N = C / (2 (Q + V))), in [v_low, v_high].

    log error-term = const + alpha log(Q + V) - beta log V; its derivative alpha/(Q+V) - beta/V is zero at
    V* = beta Q / (alpha - beta), negative below and positive above when alpha > beta: so V* when
    alpha > beta and Q > 0, the smallest V when Q = 0 (the term grows like V^(alpha-beta)), and the
    largest V when alpha <= beta (more tokens always help). Independent of C."""
    if law.A == 0 or (law.alpha == 0 and law.beta == 0):
        return v_low  # the law ignores V: the fewest tokens buy the largest N at no loss
    if law.alpha > law.beta:
        v_star = law.beta * q / (law.alpha - law.beta) if q > 0 else v_low
    else:
        v_star = v_high
    return float(min(max(v_star, v_low), v_high))


def optimal_point(law: VLMLaw, budget: float, q: float, v_low: float, v_high: float) -> dict:
    """The law's best (N, V) at budget C FLOPs per query with Q text tokens: V an integer in the observed
    range (the better of floor and ceil of the continuous optimum), N = C / (2 (Q + V))."""
    v_cont = continuous_optimal_tokens(law, q, v_low, v_high)
    lo, hi = math.ceil(v_low), math.floor(v_high)
    candidates = (
        [v_cont] if lo > hi else sorted({min(max(math.floor(v_cont), lo), hi), min(max(math.ceil(v_cont), lo), hi)})
    )
    best = None
    for v in candidates:
        n = budget / (2.0 * (q + v))
        err = float(law.error(n, v))
        if best is None or err < best[2]:
            best = (n, v, err)
    n, v, err = best
    return {
        "budget_flops": float(budget),
        "text_tokens": int(q),
        "llm_params": float(n),
        "visual_tokens": int(v) if float(v).is_integer() else float(v),
        "visual_tokens_continuous": v_cont,
        "error": err,
    }


def default_budgets(n: np.ndarray, v: np.ndarray, text_tokens: list[int], count: int = 12) -> list[float]:
    """About `count` log-spaced budgets: for each Q, an equal share spanning that Q's own costs
    2 N (Q + V) over the sweep, from its cheapest cell to its dearest (merged, sorted). A Q's costs can
    lie far from another's (Q = 0 vs 50 differ 50x at V = 1); one range over all of them would put most
    of a Q's budgets outside the LLM sizes the sweep measured."""
    n, v = np.asarray(n, float), np.asarray(v, float)
    per_q = max(2, count // max(1, len(text_tokens)))
    budgets = {
        float(c)
        for q in text_tokens
        for c in np.geomspace(2.0 * n.min() * (q + v.min()), 2.0 * n.max() * (q + v.max()), per_q)
    }
    return sorted(budgets)


def optimal_table(
    law: VLMLaw,
    budgets: list[float],
    text_tokens: list[int],
    n_range: tuple[float, float],
    v_range: tuple[float, float],
) -> list[dict]:
    """`optimal_point` for every Q and budget, each flagged `extrapolated` when its N lies outside the
    sweep's N range (V never does: it is clamped to the sweep's range)."""
    rows = []
    for q in text_tokens:
        for c in budgets:
            row = optimal_point(law, c, q, *v_range)
            row["extrapolated"] = bool(
                row["llm_params"] < n_range[0] * (1 - 1e-9) or row["llm_params"] > n_range[1] * (1 + 1e-9)
            )
            rows.append(row)
    return rows
