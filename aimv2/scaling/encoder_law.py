"""The encoder scaling fits of Chinchilla (Hoffmann et al. 2022), numpy and scipy only.

Approach 3 (parametric): L(N, D) = E + A / N^a + B / D^b, fitted as Chinchilla does: in log space,
log L ~ LSE(log A - a log N, log B - b log D, log E), minimizing the Huber loss (delta 1e-3) of the
residuals with L-BFGS from a grid of starts. The grid matters: the objective has flat directions and
local minima (the replication of Besiroglu et al. 2024 found the original fit stopped early), so every
grid point is scored and L-BFGS, with tight tolerances, runs from the best of them.

Approach 1 (envelope): at each compute level the lowest loss; log N_opt = c0 + c1 log C through the
runs on that lower envelope.

Compute-optimal size with C = k N D: L(N, C / (k N)) is minimal at N_opt = G (C/k)^(b/(a+b)),
G = (a A / (b B))^(1/(a+b)) (setting dL/dN = 0).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

HUBER_DELTA = 1e-3
# Chinchilla's grid (appendix D.2): exponents 0..2 by 0.5, log E -1..1 by 0.5, log A and log B 0..25 by 5.
GRID = {
    "a": np.arange(0.0, 2.01, 0.5),
    "b": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "log_A": np.arange(0.0, 25.1, 5.0),
    "log_B": np.arange(0.0, 25.1, 5.0),
}
EXPONENT_BOUNDS = (0.0, 5.0)  # a, b >= 0: a negative exponent would mean more parameters hurt


@dataclass(frozen=True)
class EncoderLaw:
    """L(N, D) = E + A / N^a + B / D^b (N: encoder parameters, D: training samples)."""

    E: float
    A: float
    B: float
    a: float
    b: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.a) + self.B / np.power(d, self.b)

    def optimal(self, compute, k: float) -> tuple:
        """(N_opt, D_opt, L_opt) for compute C = k N D (arrays broadcast); nan where an exponent is 0
        (the law then has no interior optimum: one of the two terms never improves)."""
        c = np.asarray(compute, dtype=float) / k
        if self.a <= 0 or self.b <= 0:
            nan = np.full_like(c, np.nan)
            return nan, nan, nan
        g = (self.a * self.A / (self.b * self.B)) ** (1.0 / (self.a + self.b))
        n = g * c ** (self.b / (self.a + self.b))
        d = c / n
        return n, d, self.loss(n, d)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LawFit:
    law: EncoderLaw
    objective: float  # sum of Huber(residual of log L) / delta^2 at the optimum
    residuals: list[float]  # log L_fit - log L per point
    grid_points: int
    starts: int  # L-BFGS runs, from the best-scoring grid points
    agreeing: int  # of those, how many ended within 1e-6 (relative) of the best objective
    at_bound: list[str]  # exponents that ended on a bound (the fit is then suspect)


def _objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, log_l: np.ndarray, delta: float) -> tuple:
    """Huber of the log-space residuals, scaled by 1/delta^2, and its gradient.
    theta = (log A, log B, log E, a, b); x = log N, y = log D."""
    log_a, log_b, e, a, b = theta
    t = np.stack([log_a - a * x, log_b - b * y, np.full_like(x, e)])  # (3, n)
    top = t.max(axis=0)
    w = np.exp(t - top)
    s = w.sum(axis=0)
    r = top + np.log(s) - log_l  # (n,)
    w = w / s  # softmax: d LSE / d t
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum() / delta**2
    dr = np.where(small, r, delta * np.sign(r)) / delta**2
    grad = np.array(
        [(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(), -(dr * w[0] * x).sum(), -(dr * w[1] * y).sum()]
    )
    return value, grad


def _grid_scores(x: np.ndarray, y: np.ndarray, log_l: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Every grid point (log A, log B, log E, a, b) and its objective, vectorized."""
    starts = np.array(list(itertools.product(GRID["log_A"], GRID["log_B"], GRID["e"], GRID["a"], GRID["b"])))
    la, lb, e, a, b = (starts[:, i : i + 1] for i in range(5))  # (S, 1)
    pred = np.logaddexp(np.logaddexp(la - a * x, lb - b * y), e)  # (S, n)
    r = pred - log_l
    huber = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1) / delta**2
    return starts, huber


def _one_blas_thread():
    """L-BFGS-B calls BLAS on 5-vectors: threaded OpenBLAS only spins there, and on a busy machine the
    spinning made a fit 5-40x slower (measured: 0.6 s with one thread, 2-27 s with two on 2 shared
    cores). threadpoolctl comes with scikit-learn; without it the fit is merely slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_law(n, d, loss, delta: float = HUBER_DELTA, starts: int = 32) -> LawFit:
    """Approach 3 on points (N, D, L): the Huber fit of log L from the `starts` best grid points."""
    from scipy.optimize import minimize

    x, y, log_l = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(np.asarray(loss, float))
    grid, scores = _grid_scores(x, y, log_l, delta)
    order = np.argsort(scores, kind="stable")[:starts]
    bounds = [(None, None), (None, None), (None, None), EXPONENT_BOUNDS, EXPONENT_BOUNDS]
    results = []
    with _one_blas_thread():
        for i in order:
            res = minimize(
                _objective,
                grid[i],
                args=(x, y, log_l, delta),
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9},
            )
            results.append((float(res.fun), res.x))
    best_value, best = min(results, key=lambda item: item[0])
    agreeing = sum(abs(v - best_value) <= 1e-6 * max(1.0, abs(best_value)) for v, _ in results)
    law = EncoderLaw(E=math.exp(best[2]), A=math.exp(best[0]), B=math.exp(best[1]), a=float(best[3]), b=float(best[4]))
    residuals = (np.log(law.loss(np.exp(x), np.exp(y))) - log_l).tolist()
    at_bound = [name for name, v in (("a", law.a), ("b", law.b)) if min(abs(v - lim) for lim in EXPONENT_BOUNDS) < 1e-6]
    return LawFit(law, best_value, residuals, len(grid), len(order), agreeing, at_bound)


@dataclass(frozen=True)
class Envelope:
    """Approach 1: log N_opt = c0 + c1 log C through the lowest-loss runs per compute level."""

    identifiable: bool
    points: list[int]  # indices (into the points given) on the envelope
    sizes: list[float]  # distinct N on the envelope
    c0: float | None = None
    c1: float | None = None
    reason: str = ""

    def n_opt(self, compute) -> np.ndarray | None:
        if not self.identifiable:
            return None
        return np.exp(self.c0 + self.c1 * np.log(np.asarray(compute, float)))


def lower_envelope(compute, loss) -> list[int]:
    """Indices of the points with a lower loss than every point of less compute (ties in compute: the
    lowest of them), in order of compute."""
    compute, loss = np.asarray(compute, float), np.asarray(loss, float)
    on, best = [], math.inf
    for c in np.unique(compute):
        idx = np.flatnonzero(compute == c)
        i = int(idx[np.argmin(loss[idx])])
        if loss[i] < best:
            on.append(i)
            best = loss[i]
    return on


def fit_envelope(n, compute, loss) -> Envelope:
    """Approach 1. With a handful of final points the envelope holds few runs, so this is a crude
    cross-check of approach 3; it is reported as not identifiable when fewer than 2 sizes are on it."""
    n, compute = np.asarray(n, float), np.asarray(compute, float)
    on = lower_envelope(compute, loss)
    sizes = sorted({float(n[i]) for i in on})
    if len(sizes) < 2:
        return Envelope(
            False,
            on,
            sizes,
            reason=f"only {len(sizes)} size on the lower envelope of loss against "
            f"compute ({len(on)} point(s)): N_opt(C) needs at least 2",
        )
    c1, c0 = np.polyfit(np.log(compute[on]), np.log(n[on]), 1)
    return Envelope(True, on, sizes, float(c0), float(c1))


def median_k(flops, n, d) -> float:
    """k of C = k N D: the median over runs of C / (N D) (FLOPs per sample per encoder parameter)."""
    return float(np.median(np.asarray(flops, float) / (np.asarray(n, float) * np.asarray(d, float))))
