"""`aimv2 scaling vlm`: the bounded fit recovers known laws, the optimum matches its closed form and a
brute-force search, the command writes what it promises, and each bad input is a one-line error."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy.optimize import least_squares

from aimv2.cli import main
from aimv2.scaling.vlm_budget import scale_vlm
from aimv2.scaling.vlm_law import (
    BOUNDS,
    VLMLaw,
    bootstrap,
    default_budgets,
    fit_law,
    on_bounds,
    optimal_point,
    optimal_table,
    rmse,
)

SIZES = [0.5e9, 1e9, 2e9, 4e9, 7e9]
TOKENS = [1, 4, 16, 64, 144, 576]
PAPER_LIKE = VLMLaw(A=0.3, alpha=0.077, beta=0.015, D=0.05)  # arXiv 2411.03312's exponents; N in billions (N_UNIT)


def sweep(law: VLMLaw, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, v = (a.ravel() for a in np.meshgrid(SIZES, TOKENS, indexing="ij"))
    error = law.error(n, v) + np.random.default_rng(seed).normal(0.0, noise, n.shape)
    return n, v, error


@pytest.mark.parametrize("true", [VLMLaw(A=5.0, alpha=0.3, beta=0.05, D=0.2), PAPER_LIKE])
def test_noise_free_sweep_recovers_the_law_within_2_percent(true):
    fitted = fit_law(*sweep(true))
    for name, value in true.as_dict().items():
        assert getattr(fitted, name) == pytest.approx(value, rel=0.02), name
    assert on_bounds(fitted) == []


def test_noisy_sweep_recovers_roughly_and_the_bootstrap_interval_holds_the_truth():
    noise = 0.0001  # about 1/800 of the error's range over the sweep (~0.08)
    n, v, error = sweep(PAPER_LIKE, noise=noise, seed=0)
    fitted = fit_law(n, v, error)
    for name in ("A", "alpha", "beta"):
        assert getattr(fitted, name) == pytest.approx(getattr(PAPER_LIKE, name), rel=0.15), name
    assert abs(fitted.D - PAPER_LIKE.D) < 0.06  # the floor is the loosest: it trades against A and alpha
    assert rmse(fitted, n, v, error) < 1.5 * noise
    # A 95% interval misses the truth in some noise draws; with this one (seed 0) it holds all four.
    ci = bootstrap(n, v, error, resamples=60, seed=0)
    for name, value in PAPER_LIKE.as_dict().items():
        assert ci[name]["p2.5"] <= value <= ci[name]["p97.5"], (name, ci[name])
        assert ci[name]["p2.5"] <= ci[name]["p50"] <= ci[name]["p97.5"]
    assert bootstrap(n, v, error, resamples=0, seed=0) is None


def test_free_fit_runs_off_on_log_linear_data_while_the_bounded_fit_stays_sane():
    """Error linear in log N and log V (no visible curvature): the unbounded fit slides down the valley
    A -> +inf, D -> -inf; the bounded one keeps D >= 0 and says it sits on that bound."""
    n, v = (a.ravel() for a in np.meshgrid([0.5e9, 1.8e9, 4e9, 7e9], [1, 4, 16, 36, 64, 144, 576], indexing="ij"))
    error = 0.62 - 0.03 * np.log(n / 1e9) - 0.012 * np.log(v)
    free = least_squares(lambda p: p[0] * n ** -p[1] * v ** -p[2] + p[3] - error, [1.0, 0.1, 0.05, 0.1])
    assert free.x[3] < -1.0  # an error floor far below zero: meaningless
    fitted = fit_law(n, v, error)
    assert 0.0 <= fitted.D <= 1.0 and 0 < fitted.alpha < 2 and 0 < fitted.beta < 2
    assert rmse(fitted, n, v, error) < 0.01
    assert any(item.startswith("D ") and "lower bound" in item for item in on_bounds(fitted))


def brute_force(law: VLMLaw, budget: float, q: int, v_low: int, v_high: int) -> tuple[int, float]:
    grid = np.arange(v_low, v_high + 1)
    error = law.error(budget / (2.0 * (q + grid)), grid)
    return int(grid[np.argmin(error)]), float(error.min())


@pytest.mark.parametrize(
    "law, q, expected_v",
    [
        (PAPER_LIKE, 50, round(0.015 * 50 / (0.077 - 0.015))),  # closed form beta Q / (alpha - beta) = 12.1
        (VLMLaw(A=5.0, alpha=0.3, beta=0.05, D=0.2), 50, 10),  # 0.05 * 50 / 0.25 = 10
        (PAPER_LIKE, 0, 1),  # cached text: the fewest tokens
        (VLMLaw(A=2.0, alpha=0.02, beta=0.1, D=0.1), 50, 576),  # alpha < beta: the most tokens
        (VLMLaw(A=2.0, alpha=0.02, beta=0.1, D=0.1), 0, 576),
        (VLMLaw(A=2.0, alpha=0.051, beta=0.05, D=0.1), 50, 576),  # V* = 2500, clamped to the sweep's largest V
    ],
)
def test_optimum_matches_the_closed_form_and_a_brute_force_search(law, q, expected_v):
    for budget in (1e10, 3e11, 1e13):
        point = optimal_point(law, budget, q, 1.0, 576.0)
        assert point["visual_tokens"] == expected_v
        assert point["llm_params"] == pytest.approx(budget / (2.0 * (q + expected_v)))
        assert point["error"] == pytest.approx(float(law.error(point["llm_params"], expected_v)))
        best_v, best_error = brute_force(law, budget, q, 1, 576)
        assert best_v == expected_v and point["error"] == pytest.approx(best_error, abs=1e-12)
        fine = np.geomspace(1.0, 576.0, 20001)  # nothing between the integers does better than rounding costs
        assert point["error"] <= law.error(budget / (2.0 * (q + fine)), fine).min() + 1e-4


def test_default_budgets_span_the_sweeps_costs_and_extrapolation_is_flagged():
    n, v, _ = sweep(PAPER_LIKE)
    budgets = default_budgets(n, v, [0, 50])
    assert len(budgets) == 12
    assert budgets[0] == pytest.approx(2 * 0.5e9 * 1) and budgets[-1] == pytest.approx(2 * 7e9 * (50 + 576))
    rows = optimal_table(PAPER_LIKE, [2 * 2e9 * 1, 2 * 100e9 * 1], [0], (0.5e9, 7e9), (1.0, 576.0))
    assert [r["extrapolated"] for r in rows] == [False, True]
    assert rows[1]["llm_params"] == pytest.approx(100e9)


def write_csv(path, rows, columns=("run", "llm_params", "visual_tokens", "error", "note")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return str(path)


def sweep_rows(noise: float = 0.001) -> list[list]:
    n, v, error = sweep(PAPER_LIKE, noise=noise)
    return [[f"run{i}", int(a), int(b), f"{e:.6f}", "extra"] for i, (a, b, e) in enumerate(zip(n, v, error))]


def test_cli_end_to_end_on_a_csv_with_extra_columns(tmp_path, capsys):
    results = write_csv(tmp_path / "results.csv", sweep_rows())
    out = tmp_path / "law"
    assert main(["scaling", "vlm", results, "--out", str(out), "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    assert "alpha=" in printed and "optimal at Q=50" in printed and str(out / "fit.json") in printed
    fit = json.loads((out / "fit.json").read_text())
    for key in ("A", "alpha", "beta", "D", "rmse"):
        assert isinstance(fit[key], float) and math.isfinite(fit[key])
    assert fit["alpha"] == pytest.approx(0.077, rel=0.2) and fit["rmse"] < 0.002
    assert set(fit["uncertainty"]["alpha"]) == {"p2.5", "p50", "p97.5"} and fit["uncertainty"]["resamples"] == 20
    assert fit["bounds"] == {k: list(b) for k, b in BOUNDS.items()}
    assert len(fit["points"]) == 30 and fit["input"]["rows"] == 30
    assert len(fit["optimal"]) == 2 * 12
    for row in fit["optimal"]:
        assert {"text_tokens", "budget_flops", "llm_params", "visual_tokens", "error", "extrapolated"} <= set(row)
        assert isinstance(row["visual_tokens"], int) and 1 <= row["visual_tokens"] <= 576
        assert row["budget_flops"] == pytest.approx(2 * row["llm_params"] * (row["text_tokens"] + row["visual_tokens"]))
    assert {r["visual_tokens"] for r in fit["optimal"] if r["text_tokens"] == 0} == {1}
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for text in (
        "alpha",
        "beta",
        f"{fit['A']:.5g}",
        f"{fit['alpha']:.5g}",
        "### Q = 50",
        "aimv2 scaling vlm",
        "--bootstrap 20",
        "extrapolated",
    ):
        assert text in report, text


@pytest.mark.parametrize("wrap", [False, True])
def test_json_input_and_the_python_entry_point(tmp_path, capsys, wrap):
    n, v, error = sweep(PAPER_LIKE)
    rows = [{"llm_params": a, "visual_tokens": int(b), "error": e, "name": "x"} for a, b, e in zip(n, v, error)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": rows} if wrap else rows))
    fit = scale_vlm(path, tmp_path / "out", text_tokens=[0, 50], budgets=[1e11, 1e12], bootstrap=0)
    assert fit == json.loads((tmp_path / "out" / "fit.json").read_text())
    assert fit["uncertainty"] is None and len(fit["optimal"]) == 4
    assert fit["alpha"] == pytest.approx(0.077, rel=0.02)
    assert [r["visual_tokens"] for r in fit["optimal"] if r["text_tokens"] == 50] == [12, 12]
    assert "--budgets 1e+11,1e+12" in (tmp_path / "out" / "report.md").read_text()
    assert "wrote" in capsys.readouterr().out


def _csv(rows, columns=("llm_params", "visual_tokens", "error")):
    return lambda path: write_csv(path, rows, columns)


def _json(text: str):
    def make(path):
        path = path.with_suffix(".json")
        path.write_text(text)
        return str(path)

    return make


GOOD = [[5e8, 1, 0.6], [5e8, 64, 0.5], [7e9, 1, 0.5], [7e9, 64, 0.4]]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: str(p.with_name("absent.csv")), ["absent.csv", "no such file"]),
        (_csv([[1, 0.5]] * 4, ("llm_params", "error")), ["missing column 'visual_tokens'"]),
        (_csv(GOOD[:2] + [[7e9, "abc", 0.5]] + GOOD[3:]), ["row 3", "line 4", "'visual_tokens'", "'abc'"]),
        (_csv(GOOD[:1] + [[5e8, 64, ""]] + GOOD[2:]), ["row 2", "'error'", "empty"]),
        (_csv(GOOD[:3]), ["needs at least 4 rows (one per parameter A, alpha, beta, D), got 3"]),
        (_csv(GOOD[:3] + [[0, 64, 0.4]]), ["row 4", "'llm_params' must be > 0"]),
        (_csv([[5e8, -1, 0.6]] + GOOD[1:]), ["row 1", "'visual_tokens' must be > 0"]),
        (_csv(GOOD[:1] + [[5e8, 64, 1.5]] + GOOD[2:]), ["row 2", "'error' must be in [0, 1]"]),
        (_csv([[5e8, v, 0.5] for v in (1, 4, 16, 64)]), ["'llm_params' takes only one value", "alpha"]),
        (_csv([[n, 16, 0.5] for n in (5e8, 1e9, 2e9, 4e9)]), ["'visual_tokens' takes only one value", "beta"]),
        (_json('[{"llm_params": 1e9, "error": 0.5}]'), ["row 1", "missing key 'visual_tokens'"]),
        (_json('{"llm_params": 1}'), ["expected a JSON list of objects"]),
        (_json('[{"llm_params": 1e9,'), ["not valid JSON"]),
    ],
)
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, capsys, make, expected):
    path = make(tmp_path / "results.csv")
    assert main(["scaling", "vlm", path, "--out", str(tmp_path / "out"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aimv2 scaling: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "out" / "fit.json").exists()


def test_negative_bootstrap_is_a_user_error(tmp_path, capsys):
    results = write_csv(tmp_path / "r.csv", GOOD, ("llm_params", "visual_tokens", "error"))
    assert main(["scaling", "vlm", results, "--out", str(tmp_path / "o"), "--bootstrap", "-1"]) == 2
    assert "bootstrap must be an integer >= 0" in capsys.readouterr().err
