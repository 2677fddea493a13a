"""`aimv2 scaling encoder` on a synthetic ladder of real run directories (config.yaml from a real
PretrainConfig, metrics.csv in the CSV logger's layout) whose val/loss follows a known Chinchilla law:
the fit must give the law back, predict the held-out run, and recommend the size the law implies.
Every bad input is one line on stderr naming the run, exit status 2."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from aimv2.cli import main
from aimv2.config import PretrainConfig, save_config
from aimv2.models.sizes import get_size, training_flops_per_sample
from aimv2.scaling.encoder_budget import scale_encoder
from aimv2.scaling.encoder_law import EncoderLaw
from aimv2.scaling.encoder_runs import encoder_params, read_run

TRUE = EncoderLaw(E=0.6, A=40.0, B=25.0, a=0.34, b=0.28)
SIZES = ("debug", "tiny", "small")
LENGTHS = (1, 3, 10)  # run lengths, as multiples of the smallest
BATCH = 64  # global samples per step
IMG, TEXT_LEN, VOCAB = 224, 77, 49408
COLUMNS = [
    "epoch",
    "step",
    "train/loss",
    "val/loss",
    "val/loss_img",
    "val/loss_text",
    "val/train_samples",
    "val/train_flops",
]


def per_sample(size: str) -> float:
    return training_flops_per_sample(get_size(size), IMG, TEXT_LEN, TEXT_LEN, VOCAB)["total"]


def write_run(root: Path, size: str, steps: int, *, loss=None, columns=COLUMNS, val_every: int | None = None) -> Path:
    """A run directory as `aimv2 pretrain` leaves it: config.yaml and logs/metrics.csv with train rows and
    val rows (every val_every steps and at the last step), val/loss from TRUE unless `loss` is given.
    As aimv2.pretraining.validation writes them: the row of the K-th optimizer step is row K-1."""
    cfg = PretrainConfig()
    cfg.run_dir, cfg.model.size, cfg.model.img_size, cfg.data.batch_size = str(root), size, IMG, BATCH
    cfg.trainer.max_steps = steps
    save_config(cfg, root / "config.yaml")
    n = encoder_params(size, IMG)
    rows = []
    val_steps = sorted({*range(val_every or steps, steps, val_every or steps), steps})
    for step in range(0, steps + 1, max(1, steps // 4)):
        rows.append({"epoch": 0, "step": step, "train/loss": 3.0})
    for step in val_steps:
        samples = step * BATCH
        value = float(TRUE.loss(n, samples)) if loss is None else loss
        rows.append(
            {
                "epoch": 0,
                "step": step - 1,
                "val/loss": value,
                "val/loss_img": 0.4 * value,
                "val/loss_text": 0.6 * value,
                "val/train_samples": samples,
                "val/train_flops": samples * per_sample(size),
            }
        )
    (root / "logs").mkdir(parents=True, exist_ok=True)
    with open(root / "logs" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["step"]))
    return root


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """3 sizes x 3 lengths; bigger sizes train a little longer (as a real ladder would), so the sample
    counts differ across sizes too. Val points every quarter of the run (the fit uses the last)."""
    base = tmp_path_factory.mktemp("ladder")
    runs = {}
    for i, size in enumerate(SIZES):
        for m in LENGTHS:
            steps = int(300 * m * (1 + 0.5 * i))
            runs[(size, m)] = write_run(base / f"{size}_x{m}", size, steps, val_every=max(1, steps // 4))
    return runs


def expected_k(ladder) -> float:
    """The k = C / (N D) the code should estimate: the median over runs."""
    return float(np.median([per_sample(s) / encoder_params(s, IMG) for s, _ in ladder]))


@pytest.fixture(scope="module")
def fitted(ladder, tmp_path_factory):
    """One fit (default holdout: the most compute, small x10) with a budget whose true optimum is `large`."""
    k = expected_k(ladder)
    n_large = encoder_params("large", IMG)
    g = (TRUE.a * TRUE.A / (TRUE.b * TRUE.B)) ** (1 / (TRUE.a + TRUE.b))
    budget = k * (n_large / g) ** ((TRUE.a + TRUE.b) / TRUE.b)  # N_opt(budget) = N_large under TRUE
    out = tmp_path_factory.mktemp("fit") / "out"
    fit = scale_encoder([str(p) for p in ladder.values()], out, budgets=[budget])
    return fit, out, budget, k


def test_fit_recovers_the_true_law(fitted):
    fit, _, _, _ = fitted
    p = fit["params"]
    for name in ("E", "a", "b"):
        assert p[name] == pytest.approx(getattr(TRUE, name), rel=0.03), name
    for name in ("A", "B"):
        assert p[name] == pytest.approx(getattr(TRUE, name), rel=0.15), name
    assert fit["fit"]["runs"] == 8 and fit["fit"]["max_abs_log_residual"] < 1e-4


def test_held_out_run_is_the_most_compute_and_predicted_within_one_percent(fitted, ladder):
    fit, _, _, _ = fitted
    assert [h["run"] for h in fit["held_out"]] == [str(ladder[("small", 10)])]
    assert abs(fit["held_out"][0]["rel_error"]) < 0.01
    held = [q for q in fit["points"] if q["held_out"]]
    assert len(held) == 1 and held[0]["size"] == "small"


def test_points_are_the_final_val_loss_with_exact_parameter_counts(fitted, ladder):
    import torch

    from aimv2.models import AIMv2
    from aimv2.models.encoder import build_encoder

    fit, _, _, _ = fitted
    q = next(q for q in fit["points"] if q["run"] == str(ladder[("debug", 3)]))
    steps = 300 * 3
    assert q["step"] == steps - 1 and q["samples"] == steps * BATCH
    assert q["val_loss"] == pytest.approx(float(TRUE.loss(q["N_encoder"], q["samples"])))
    torch.manual_seed(0)
    assert q["N_encoder"] == sum(p.numel() for p in build_encoder(get_size("debug"), IMG).parameters())
    assert q["N_total"] == sum(p.numel() for p in AIMv2(get_size("debug"), IMG, VOCAB, TEXT_LEN).parameters())


def test_compute_optimal_size_matches_the_closed_form_and_the_table(fitted):
    fit, _, budget, k = fitted
    assert fit["k"]["value"] == pytest.approx(k, rel=1e-9)
    p = fit["params"]
    g = (p["a"] * p["A"] / (p["b"] * p["B"])) ** (1 / (p["a"] + p["b"]))
    n_closed = g * (budget / k) ** (p["b"] / (p["a"] + p["b"]))
    best = fit["best"][0]
    assert best["flops"] == pytest.approx(budget)
    assert best["approach3"]["N"] == pytest.approx(n_closed, rel=1e-9)
    assert best["approach3"]["N"] == pytest.approx(encoder_params("large", IMG), rel=0.1)  # true optimum: large
    near = best["nearest_size"]
    assert near["size"] == "large"
    assert near["samples"] == pytest.approx(budget / (k * near["N_encoder"]))
    assert near["steps"] == math.ceil(near["samples"] / BATCH)
    # numerically: L(N, C / (k N)) is lowest at N_opt
    law = EncoderLaw(**p)
    ns = best["approach3"]["N"] * np.array([0.8, 1.0, 1.25])
    losses = law.loss(ns, budget / (k * ns))
    assert losses[1] < losses[0] and losses[1] < losses[2]
    assert fit["global_batch"] == BATCH


def test_cli_end_to_end(ladder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["scaling", "encoder", *map(str, ladder.values()), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "L(N, D) =" in printed and "held out" in printed and "fit.json" in printed
    fit = json.loads((out / "fit.json").read_text())
    assert {"params", "k", "points", "held_out", "approach1", "best", "approximations", "command"} <= set(fit)
    assert set(fit["params"]) == {"E", "A", "B", "a", "b"}
    assert {"run", "size", "N_encoder", "N_total", "samples", "flops", "val_loss", "held_out"} <= set(fit["points"][0])
    largest = max(q["flops"] for q in fit["points"])
    assert [b["flops"] for b in fit["best"]] == pytest.approx([largest, 10 * largest, 100 * largest])
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for text in (
        "## Runs",
        "## Fitted law",
        "## Held-out check",
        "## Recommendations",
        "## Approximations",
        "aimv2 scaling encoder",
        str(ladder[("small", 10)]),
    ):
        assert text in md, text


def test_cli_holdout_and_budgets(ladder, tmp_path, capsys):
    """--holdout names the runs predicted (a run not listed among RUN_DIR is read too); --budgets as given."""
    runs = [str(p) for k, p in ladder.items() if k != ("tiny", 10)]
    held = str(ladder[("tiny", 10)])
    out = tmp_path / "out"
    assert main(["scaling", "encoder", *runs, "--holdout", held, "--out", str(out), "--budgets", "1e17,1e16"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert [h["run"] for h in fit["held_out"]] == [held] and abs(fit["held_out"][0]["rel_error"]) < 0.01
    assert fit["fit"]["runs"] == 8 and [b["flops"] for b in fit["best"]] == [1e16, 1e17]
    assert "--holdout" in fit["command"] and "--budgets 1e+17,1e+16" in fit["command"]
    capsys.readouterr()
    err = _error([*runs, "--holdout", held, held + "/.", "--out", str(out)], capsys)
    assert "duplicate run directory in --holdout" in err and held in err


def test_envelope_with_one_size_on_it_is_not_identifiable():
    from aimv2.scaling.encoder_law import fit_envelope

    # the smallest model is best at every compute: one size on the envelope
    env = fit_envelope([1e5, 1e5, 1e6, 1e6], [1e10, 1e11, 1e11, 1e12], [2.0, 1.5, 1.8, 1.6])
    assert not env.identifiable and "only 1 size" in env.reason and env.n_opt(1e13) is None
    env = fit_envelope([1e5, 1e5, 1e6, 1e6], [1e10, 1e11, 1e11, 1e12], [2.0, 1.5, 1.8, 1.2])
    assert env.identifiable and env.points == [0, 1, 3] and env.c1 > 0


def test_all_points_and_no_holdout(ladder, tmp_path):
    """points='all' fits every logged val point (the generator is exact at each); holdout=[] fits every run."""
    fit = scale_encoder([str(p) for p in ladder.values()], tmp_path / "o", holdout=[], points="all")
    assert fit["held_out"] == [] and fit["fit"]["runs"] == 9 and fit["fit"]["points"] > 9
    assert fit["params"]["a"] == pytest.approx(TRUE.a, rel=0.03)
    assert "not validated" in (tmp_path / "o" / "report.md").read_text()


def test_flops_computed_when_not_logged(tmp_path):
    """Without val/train_flops the compute is samples x training_flops_per_sample (and said so)."""
    logged = read_run(str(write_run(tmp_path / "a", "tiny", 100)))[0]
    computed = read_run(str(write_run(tmp_path / "b", "tiny", 100, columns=COLUMNS[:-1])))[0]
    assert logged.flops_logged and not computed.flops_logged
    assert logged.samples_per_step == BATCH  # from the one val row: samples / (row + 1)
    assert computed.flops == pytest.approx(logged.flops, rel=1e-12)


def _error(argv: list[str], capsys) -> str:
    assert main(["scaling", "encoder", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_bad_inputs_are_one_line_naming_the_run(ladder, tmp_path, capsys):
    good = [str(p) for p in ladder.values()]
    out = ["--out", str(tmp_path / "out")]

    missing = tmp_path / "nowhere"
    assert str(missing) in (err := _error([*good, str(missing), *out], capsys)) and "not a directory" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in (err := _error([*good, str(empty), *out], capsys)) and "config.yaml" in err

    no_logs = tmp_path / "no_logs"
    save_config(PretrainConfig(), no_logs / "config.yaml")
    assert str(no_logs) in (err := _error([*good, str(no_logs), *out], capsys)) and "logs/metrics.csv" in err

    no_val = write_run(tmp_path / "no_val", "tiny", 100, columns=["epoch", "step", "train/loss"])
    err = _error([*good, str(no_val), *out], capsys)
    assert str(no_val) in err and "no val/loss" in err and "data.val.urls" in err

    for name, value in (("nan", math.nan), ("inf", math.inf), ("zero", 0.0), ("negative", -1.0)):
        bad = write_run(tmp_path / name, "tiny", 100, loss=value)
        err = _error([*good, str(bad), *out], capsys)
        assert str(bad) in err and "not a finite positive loss" in err, err

    err = _error([*good, good[0] + "/.", *out], capsys)
    assert "duplicate run directory" in err and good[0] in err

    assert not (tmp_path / "out").exists()  # nothing written on an error


def test_too_little_data_is_refused(ladder, tmp_path, capsys):
    runs = [str(p) for p in ladder.values()]
    err = _error([*runs[:5], "--out", str(tmp_path / "o")], capsys)  # 5 runs, 1 held out: 4 in the fit
    assert "4 run(s) in the fit" in err and "at least 5" in err
    debug = [write_run(tmp_path / f"d{s}", "debug", s) for s in (100, 200, 300, 400, 500, 600)]
    err = _error([*map(str, debug), "--out", str(tmp_path / "o")], capsys)
    assert "model.size=debug" in err and "size exponent cannot be identified" in err
    same = [write_run(tmp_path / f"s{s}", s, 500) for s in ("debug", "tiny", "small")]
    same += [write_run(tmp_path / f"t{s}", s, 500) for s in ("debug", "tiny", "small")]
    err = _error([*map(str, same), "--out", str(tmp_path / "o")], capsys)
    assert "data exponent cannot be identified" in err
