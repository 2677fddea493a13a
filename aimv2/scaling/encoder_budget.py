"""`aimv2 scaling encoder`: which encoder size to pre-train for a compute budget, from a ladder of runs.

The ladder's final held-out losses are fitted with Chinchilla's parametric law (approach 3) after
holding out the run(s) it must then predict (by default the one with the most compute: the
extrapolation a recommendation makes), cross-checked with the lower envelope (approach 1), and turned
into a size of the table with the steps it implies at the ladder's batch. Writes OUT/fit.json,
OUT/scaling.png and OUT/report.md; the reading is in encoder_runs, the fits in encoder_law, the
pictures in encoder_report.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np

from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError
from aimv2.fileio import atomic_write
from aimv2.scaling.encoder_law import HUBER_DELTA, fit_envelope, fit_law, median_k
from aimv2.scaling.encoder_report import encoder_scaling_markdown, format_params, law_text, plot_scaling
from aimv2.scaling.encoder_runs import Point, common_value, encoder_params, flops_per_sample, read_ladder

MIN_POINTS = 5  # E, A, B, a, b


def _clean(value):
    """JSON-ready: numpy scalars to Python, nan/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _holdout_runs(runs: list[str], holdout: list[str] | None, finals: dict[str, Point]) -> list[str]:
    """The held-out runs, as they appear in `runs`: default the one with the most compute."""
    if holdout is None:
        return [max(runs, key=lambda r: finals[r].flops)]
    by_dir = {Path(r).resolve(): r for r in runs}
    return [by_dir[Path(h).resolve()] for h in holdout]


def _check_identifiable(fit_points: list[Point], n_runs: int, n_held: int, points: str) -> None:
    """Five parameters need five points, two sizes (the size exponent) and two sample counts (the data one)."""
    if len(fit_points) < MIN_POINTS:
        what = f"{len(fit_points)} run(s)" if points == "last" else f"{len(fit_points)} point(s) of {n_runs} run(s)"
        raise UserError(
            f"{what} in the fit after holding out {n_held}: approach 3 (E + A/N^a + B/D^b) has 5 "
            f"parameters and needs at least {MIN_POINTS}: add runs to the ladder (or hold out fewer with "
            "--holdout)"
        )
    sizes = sorted({p.size for p in fit_points})
    after = f" (after holding out {n_held}: see --holdout)" if n_held else ""
    if len({p.n_encoder for p in fit_points}) < 2:
        raise UserError(
            f"all runs in the fit{after} have model.size={'/'.join(sizes)}: the size exponent cannot be "
            "identified (the ladder needs at least 2 sizes)"
        )
    if len({p.samples for p in fit_points}) < 2 or len({p.flops for p in fit_points}) < 2:
        raise UserError(
            f"all runs in the fit{after} trained on {fit_points[0].samples:g} samples: the data exponent "
            "cannot be identified (the ladder needs at least 2 run lengths)"
        )


def _size_table(img_size: int, native: bool, text_len: int, vocab: int | None) -> list[dict]:
    """Every row of the size table at the ladder's settings: encoder params and exact FLOPs per sample."""
    from aimv2.models.sizes import SIZES

    rows = []
    for name in SIZES:
        per_sample = flops_per_sample(name, img_size, text_len, vocab) if vocab else None
        rows.append({"size": name, "N_encoder": encoder_params(name, img_size, native), "flops_per_sample": per_sample})
    return rows


def _steps(samples: float, batch: float | None) -> int | None:
    return math.ceil(samples / batch) if batch and math.isfinite(samples) else None


def _best(budget: float, law, k: float, envelope, table: list[dict], batch: float | None) -> dict:
    """The recommendation for one budget: approach 3's N_opt, approach 1's, the nearest table row (at
    C / (k N) samples) and the table row that wins when each row's FLOPs per sample are counted exactly."""
    n_opt, d_opt, l_opt = (float(v) for v in law.optimal(budget, k))
    a1 = envelope.n_opt(budget)
    near = None
    if math.isfinite(n_opt):
        row = min(table, key=lambda r: abs(math.log(r["N_encoder"] / n_opt)))
        samples = budget / (k * row["N_encoder"])
        near = {
            "size": row["size"],
            "N_encoder": row["N_encoder"],
            "samples": samples,
            "steps": _steps(samples, batch),
            "loss": float(law.loss(row["N_encoder"], samples)),
        }
    by_size = []
    for row in table:
        if row["flops_per_sample"]:
            samples = budget / row["flops_per_sample"]
            by_size.append(
                {
                    **row,
                    "samples": samples,
                    "steps": _steps(samples, batch),
                    "loss": float(law.loss(row["N_encoder"], samples)),
                }
            )
    exact = min(by_size, key=lambda r: r["loss"]) if by_size else None
    return {
        "flops": budget,
        "approach3": {"N": n_opt, "samples": d_opt, "steps": _steps(d_opt, batch), "loss": l_opt},
        "approach1_N": None if a1 is None else float(a1),
        "nearest_size": near,
        "best_size_exact_flops": exact,
        "by_size": by_size,
    }


def _approximations(points: list[Point], ks: list[float], table_settings: tuple, points_mode: str) -> list[str]:
    notes = [
        "D is training samples, not tokens: at a fixed img_size every sample has the same number of patches "
        "(and a caption of at most max_length tokens), so tokens would only rescale B.",
        "N is the encoder's parameter count (what is deployed); the decoder is outside N but not outside the "
        "compute: it sits in k.",
        f"C = k N D with one k, the median of C / (N D) over the runs; per run it ranges {min(ks):.3g} .. "
        f"{max(ks):.3g} (the decoder, attention and vocabulary head do not scale with N). The 'best size by "
        "exact FLOPs' column does not use k.",
    ]
    if points_mode == "last":
        notes.append(
            "Each run contributes its final val/loss: intermediate points of a cosine schedule sit above "
            "what a run of that length reaches (Chinchilla)."
        )
    else:
        notes.append(
            "Every logged val/loss of each run is a point (points='all'): intermediate points of a cosine "
            "schedule are biased upwards (Chinchilla uses final points for approach 3)."
        )
    computed = sorted({p.run for p in points if not p.flops_logged})
    if computed:
        notes.append(
            f"val/train_flops was not logged by {', '.join(computed)}: computed as val/train_samples x "
            "training_flops_per_sample with text_tokens = max_length (the vocabulary head charged for "
            "padding too: an over-estimate)."
        )
    img, native, text_len, vocab = table_settings
    if len({(p.settings.img_size, p.settings.text_len, p.settings.vocab) for p in points}) > 1:
        notes.append(
            f"The runs differ in img_size, max_length or vocabulary: the size table is counted at "
            f"img_size={img}, max_length={text_len}, vocabulary={vocab} (the most common)."
        )
    if native:
        notes.append(
            "Native-resolution runs: patches per sample vary; FLOPs of the size table use the nominal img_size."
        )
    if vocab is None:
        notes.append("The vocabulary size is unknown: no 'best size by exact FLOPs' and no total parameter counts.")
    return notes


def _command(runs: list[str], out: str, holdout: list[str] | None, budgets: list[float] | None, points: str) -> str:
    parts = ["aimv2", "scaling", "encoder", *runs, "--out", str(out)]
    if holdout is not None:
        parts += ["--holdout", *holdout]
    if budgets:
        parts += ["--budgets", ",".join(f"{b:g}" for b in budgets)]
    line = shlex.join(parts)
    return line if points == "last" else f"{line}  # with points='all' (scale_encoder(..., points='all'); no CLI flag)"


def expand_ladder(path: str) -> list[str]:
    """A run directory as given; a directory that is no run but holds runs (e.g. runs/ladder/runs)
    stands for its runs, in name order. Anything else is left for read_run to refuse by name."""
    root = Path(path)
    if not root.is_dir() or RunDir(root).config.is_file():
        return [path]
    children = sorted(str(c) for c in root.iterdir() if RunDir(c).config.is_file())
    return children or [path]


def scale_encoder(
    runs: list[str],
    out: str | Path,
    holdout: list[str] | None = None,
    budgets: list[float] | None = None,
    points: str = "last",
) -> dict:
    """Fit the ladder, check the held-out run(s), recommend sizes; write OUT/fit.json, scaling.png and
    report.md and return the fit.json content. holdout: None holds out the run with the most compute,
    [] holds out nothing (the law is then not validated). points: "last" (each run's final val/loss) or
    "all" (every logged one)."""
    runs = [r for given in runs for r in expand_ladder(str(given))]
    seen: dict[Path, str] = {}
    for h in holdout or []:
        if Path(h).resolve() in seen:
            raise UserError(f"{h}: duplicate run directory in --holdout (also given as {seen[Path(h).resolve()]})")
        seen[Path(h).resolve()] = str(h)
    listed = {Path(r).resolve() for r in runs}
    extra = [str(h) for h in holdout or [] if Path(h).resolve() not in listed]  # held out, not listed: read too
    all_runs = runs + extra
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    ladder = read_ladder(all_runs, points)
    finals = {p.run: p for p in ladder}  # the last point of each run (points come in step order)
    held = set(_holdout_runs(all_runs, None if holdout is None else [str(h) for h in holdout], finals))
    ladder = [replace(p, held_out=p.run in held) for p in ladder]
    finals = {p.run: p for p in ladder}
    fit_points = [p for p in ladder if not p.held_out]
    _check_identifiable(fit_points, len(all_runs) - len(held), len(held), points)

    last = [finals[r] for r in all_runs]  # k per run, from its final point
    ks = [p.k for p in last]
    k = median_k([p.flops for p in last], [p.n_encoder for p in last], [p.samples for p in last])
    result = fit_law(
        [p.n_encoder for p in fit_points], [p.samples for p in fit_points], [p.val_loss for p in fit_points]
    )
    law = result.law
    envelope = fit_envelope(
        [p.n_encoder for p in fit_points], [p.flops for p in fit_points], [p.val_loss for p in fit_points]
    )
    held_out = []
    for run in all_runs:
        if run in held:
            q = finals[run]
            predicted = float(law.loss(q.n_encoder, q.samples))
            held_out.append(
                {
                    "run": run,
                    "size": q.size,
                    "val_loss": q.val_loss,
                    "predicted": predicted,
                    "rel_error": predicted / q.val_loss - 1.0,
                }
            )

    settings = [finals[r].settings for r in all_runs]
    table_settings = (
        common_value([s.img_size for s in settings]),
        any(s.native for s in settings),
        common_value([s.text_len for s in settings]),
        common_value([s.vocab for s in settings]),
    )
    table = _size_table(*table_settings)
    batch = common_value([finals[r].samples_per_step for r in all_runs])
    largest = max(p.flops for p in finals.values())
    budget_list = sorted(budgets) if budgets else [largest, 10 * largest, 100 * largest]
    best = [_best(b, law, k, envelope, table, batch) for b in budget_list]

    fit_runs = sorted({p.run for p in fit_points}, key=all_runs.index)
    fit = _clean(
        {
            "law": "L(N, D) = E + A / N^a + B / D^b",
            "data_axis": "samples",
            "params": law.as_dict(),
            "fit": {
                "runs": len(fit_runs),
                "points": len(fit_points),
                "huber_delta": HUBER_DELTA,
                "objective": result.objective,
                "grid_points": result.grid_points,
                "starts": result.starts,
                "agreeing": result.agreeing,
                "at_bound": result.at_bound,
                "max_abs_log_residual": float(np.max(np.abs(result.residuals))),
            },
            "k": {
                "value": k,
                "min": min(ks),
                "max": max(ks),
                "definition": "C / (N_encoder * samples), median over runs",
            },
            "points": [
                {
                    "run": p.run,
                    "size": p.size,
                    "step": p.step,
                    "N_encoder": p.n_encoder,
                    "N_total": p.n_total,
                    "samples": p.samples,
                    "flops": p.flops,
                    "flops_logged": p.flops_logged,
                    "val_loss": p.val_loss,
                    "held_out": p.held_out,
                }
                for p in ladder
            ],
            "held_out": held_out,
            "approach1": {
                "identifiable": envelope.identifiable,
                "c0": envelope.c0,
                "c1": envelope.c1,
                "runs": [fit_points[i].run for i in envelope.points],
                "points": len(envelope.points),
                "reason": envelope.reason,
            },
            "global_batch": batch,
            "size_table": {
                "img_size": table_settings[0],
                "native": table_settings[1],
                "max_length": table_settings[2],
                "vocab_size": table_settings[3],
            },
            "best": best,
            "approximations": _approximations(ladder, ks, table_settings, points),
            "command": _command(runs, str(out), holdout, budgets, points),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    paths = {"fit": out / "fit.json", "plot": out / "scaling.png", "report": out / "report.md"}
    fit["outputs"] = {k_: str(v) for k_, v in paths.items()}
    atomic_write(paths["fit"], json.dumps(fit, indent=2) + "\n")
    plot_scaling(fit, paths["plot"])
    atomic_write(paths["report"], encoder_scaling_markdown(fit))
    print(summary(fit))
    return fit


def summary(fit: dict) -> str:
    """The few lines a terminal shows: law, held-out check, best size per budget, files."""
    f = fit["fit"]
    lines = [
        f"encoder scaling law from {f['runs']} run(s) in the fit ({len(fit['held_out'])} held out):",
        f"  {law_text(fit['params'])}   (D: samples; k = C/(N D) = {fit['k']['value']:.3g})",
    ]
    for h in fit["held_out"]:
        lines.append(
            f"  held out {h['run']}: val/loss {h['val_loss']:.4f}, predicted {h['predicted']:.4f} "
            f"({100 * h['rel_error']:+.2f}%)"
        )
    a1 = fit["approach1"]
    lines.append(
        f"  approach 1: log N_opt = {a1['c0']:.3g} + {a1['c1']:.3g} log C ({a1['points']} envelope point(s))"
        if a1["identifiable"]
        else f"  approach 1: not identifiable ({a1['reason']})"
    )
    for b in fit["best"]:
        a3, near, exact = b["approach3"], b["nearest_size"], b["best_size_exact_flops"]
        text = (
            f"  budget {b['flops']:.3g} FLOPs: N_opt {format_params(a3['N'])}"
            if a3["N"]
            else f"  budget {b['flops']:.3g} FLOPs: no optimum (an exponent is 0)"
        )
        if b["approach1_N"]:
            text += f" (approach 1: {format_params(b['approach1_N'])})"
        if near:
            text += (
                f"; nearest size {near['size']}: {near['samples']:.3g} samples"
                + (f" = {near['steps']} steps" if near["steps"] else "")
                + f", loss {near['loss']:.4f}"
            )
        if exact:
            text += f"; best by exact FLOPs: {exact['size']}"
        lines.append(text)
    lines.append(f"  wrote {', '.join(fit['outputs'].values())}")
    return "\n".join(lines)
