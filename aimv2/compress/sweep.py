"""`aimv2 compress sweep`: LMs x M visual tokens, one compressor trained and evaluated per cell through
`aimv2 compress train` and `evaluate`, gathered into one results file, then the scaling law fitted
(aimv2.scaling.vlm_budget: error = A N^-alpha V^-beta + D and the inference-optimal N and V).

Layout under `out`:
  cells/<lm>_m<M>/           an `aimv2 compress train` run directory per cell
  cells/<lm>_m<M>/eval/      its evaluation (results.json, with the fingerprint of what made it)
  results.csv                one row per finished cell: llm_params, visual_tokens, error, ...
  fit/                       fit.json, frontier.png, report.md (aimv2.scaling.vlm_budget), once every cell is done

Resumable cell by cell: a cell whose evaluation exists for the same settings is not repeated, a
cell trained to its `trainer.max_steps` is not trained again, an interrupted one continues from its
newest checkpoint (`trainer.resume=auto`). A cell directory made with other settings is refused
rather than silently reused. The error is the held-out caption token error (1 - greedy next-token
accuracy): bounded in [0, 1] like the downstream errors the paper fits; the caption loss is kept
beside it. N is the LM's parameter count without its input embedding table (aimv2.compress.vlm).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from aimv2.compress.config import CompressConfig, SweepConfig, SweepLM
from aimv2.config import load_config
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError
from aimv2.fileio import atomic_write

COLUMNS = (
    "lm",
    "llm_params",
    "visual_tokens",
    "error",
    "loss",
    "perplexity",
    "text_tokens",
    "prefill_gflops",
    "images",
    "compressor",
    "checkpoint",
)


@dataclass(frozen=True)
class Cell:
    index: int
    lm: SweepLM
    tokens: int  # M

    @property
    def name(self) -> str:
        return f"{self.lm.name}_m{self.tokens}"


def _say(message: str) -> None:
    print(f"compress sweep: {message}", file=sys.stderr, flush=True)


def _q(value: object) -> str:
    """A value as a quoted YAML string for a key=value override (paths may hold ':' or braces)."""
    return "'" + str(value).replace("'", "''") + "'"


def cells(sweep: SweepConfig) -> list[Cell]:
    """LM-major order: cell i = LM i // len(tokens), M = tokens[i % len(tokens)] (SLURM array index)."""
    return [
        Cell(i * len(sweep.tokens) + j, lm, m) for i, lm in enumerate(sweep.lms) for j, m in enumerate(sweep.tokens)
    ]


def compress_config_path(sweep: SweepConfig, sweep_file: str | Path | None) -> Path:
    """`compress`, relative to the sweep file's directory (as a config's `base:` is); else as given."""
    from aimv2.shipped import user_config

    given = Path(sweep.compress)
    if sweep_file is not None and not given.is_absolute() and (Path(sweep_file).parent / given).is_file():
        return Path(sweep_file).parent / given
    path = user_config(given)
    if not path.is_file():
        raise UserError(f"config key 'compress': config file not found: {given}")
    return path


def cell_config(sweep: SweepConfig, cell: Cell, compress_file: Path) -> CompressConfig:
    """The compress config of a cell: the sweep's overrides, then the LM's, then the cell's own."""
    from aimv2.compress.train import resolve_paths

    run = Path(sweep.out) / "cells" / cell.name
    lm = [f"lm.path={_q(cell.lm.path)}"] if cell.lm.path else []
    own = [
        f"compressor.num_tokens={cell.tokens}",
        "compressor.train_tokens=[]",
        f"run_dir={_q(run)}",
        "trainer.resume=auto",
        "trainer.devices=1",
        "trainer.num_nodes=1",
    ]
    try:
        cfg = load_config(compress_file, [*sweep.overrides, *lm, *cell.lm.overrides, *own], schema=CompressConfig)
    except UserError as err:
        raise UserError(f"cell {cell.name}: {err}") from None
    if cfg.compressor.kind == "mlp":
        raise UserError(
            "config key 'compressor.kind': mlp keeps all N patch tokens; a sweep over M needs a "
            "compressor that makes M tokens (pool, kdv, resampler, tokenpacker, quecc)"
        )
    return resolve_paths(cfg)


def _yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _held_out(sweep: SweepConfig, cfg: CompressConfig) -> str:
    """The shards a cell is scored on: the sweep's eval.val, else the compress config's data.val."""
    return sweep.eval.val or cfg.data.val


def _fingerprint(cfg: CompressConfig, sweep: SweepConfig) -> str:
    made = json.dumps({"config": _yaml(cfg), "eval": asdict(sweep.eval), "val": _held_out(sweep, cfg)}, sort_keys=True)
    return hashlib.sha256(made.encode()).hexdigest()[:16]


def _result_file(cfg: CompressConfig) -> Path:
    """RUN/eval/results.json of the cell whose config is `cfg` (the evaluation directory is a run directory)."""
    return RunDir(RunDir(cfg.run_dir).eval).results_json


def _finished_row(sweep: SweepConfig, cfg: CompressConfig) -> dict | None:
    """The cell's result row when its evaluation exists for the current settings, else None."""
    path = _result_file(cfg)
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return done["row"] if done.get("fingerprint") == _fingerprint(cfg, sweep) else None


def check_cells(sweep: SweepConfig, sweep_file: str | Path | None) -> Path:
    """Every cell's compress config loads and validates (before the first cell trains, and for
    `--list`); returns the compress config file."""
    compress_file = compress_config_path(sweep, sweep_file)
    for c in cells(sweep):
        cell_config(sweep, c, compress_file)
    return compress_file


def run_cell(sweep: SweepConfig, cell: Cell, compress_file: Path) -> dict:
    """Train (or finish) and evaluate one cell; returns its result row. Nothing is redone that exists
    for the same settings."""
    from aimv2.compress.evaluate import evaluate_checkpoint
    from aimv2.compress.train import train
    from aimv2.engine.checkpointing import checkpoint_step

    cfg = cell_config(sweep, cell, compress_file)
    run = RunDir(cfg.run_dir)
    val = _held_out(sweep, cfg)
    if not val:
        raise UserError(
            f"config key 'eval.val': no held-out shards (set eval.val in the sweep, or data.val in {compress_file})"
        )
    done = _finished_row(sweep, cfg)
    if done is not None:
        _say(f"cell {cell.index} ({cell.name}): done ({_result_file(cfg)})")
        return done
    if run.config.is_file() and run.config.read_text(encoding="utf-8") != _yaml(cfg):
        raise UserError(
            f"{run.root} was trained with other settings (see its config.yaml): delete the cell "
            "directory to retrain it, or choose another `out`"
        )
    last = run.last_checkpoint
    if last.is_file() and checkpoint_step(last) >= cfg.trainer.max_steps:
        _say(f"cell {cell.index} ({cell.name}): trained ({last})")
    else:
        _say(f"cell {cell.index} ({cell.name}): training M={cell.tokens} with LM {cell.lm.name} in {run.root}")
        train(cfg)
    _say(f"cell {cell.index} ({cell.name}): evaluating on {val}")
    e = sweep.eval
    (row,) = evaluate_checkpoint(
        str(last),
        val=val,
        num_tokens=[cell.tokens],
        batch_size=e.batch_size,
        num_workers=e.num_workers,
        max_batches=e.max_batches,
        device=e.device,
    )
    result = {
        "lm": cell.lm.name,
        "llm_params": row.lm_params,
        "visual_tokens": row.num_tokens,
        "error": row.token_error,
        "loss": row.loss,
        "perplexity": row.perplexity,
        "text_tokens": row.text_tokens,
        "prefill_gflops": row.prefill_gflops,
        "images": row.images,
        "compressor": row.compressor,
        "checkpoint": row.run,
    }
    run.eval.mkdir(parents=True, exist_ok=True)
    atomic_write(
        _result_file(cfg),
        json.dumps({"fingerprint": _fingerprint(cfg, sweep), "cell": cell.index, "row": result}, indent=1) + "\n",
    )
    return result


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Array tasks finishing together gather (and fit) one at a time: a file lock beside the results."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gather(sweep: SweepConfig, compress_file: Path) -> tuple[list[dict], list[Cell]]:
    """Rows of the finished cells (evaluation present for the current settings) and the missing cells."""
    rows, missing = [], []
    for cell in cells(sweep):
        row = _finished_row(sweep, cell_config(sweep, cell, compress_file))
        if row is not None:
            rows.append(row)
        else:
            missing.append(cell)
    return rows, missing


def write_results(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in COLUMNS} for row in rows)
    atomic_write(path, buffer.getvalue())


def run_sweep(sweep: SweepConfig, sweep_file: str | Path | None = None, cell: int | None = None) -> bool:
    """Every cell (or only `cell`), then results.csv; True once every cell is done (the fit's turn:
    aimv2.scaling.vlm_budget, which the command runs; this job knows nothing of scaling laws)."""
    compress_file = check_cells(sweep, sweep_file)
    grid = cells(sweep)
    if cell is not None and not 0 <= cell < len(grid):
        raise UserError(f"--cell {cell}: the sweep has {len(grid)} cells (0..{len(grid) - 1})")
    for c in grid if cell is None else [grid[cell]]:
        run_cell(sweep, c, compress_file)
    out = Path(sweep.out)
    with locked(out):
        rows, missing = gather(sweep, compress_file)
        write_results(rows, out / "results.csv")
    _say(f"{len(rows)} of {len(grid)} cells done: {out / 'results.csv'}")
    if missing:
        _say("the fit waits for cells " + ", ".join(f"{c.index} ({c.name})" for c in missing))
    return not missing


def array_index(value: str) -> int:
    """`--cell`: a number, or `auto` for this SLURM array task's index."""
    if value == "auto":
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task is None:
            raise UserError("--cell auto: SLURM_ARRAY_TASK_ID is not set (not a SLURM array task); give a number")
        value = task
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--cell: expected a cell number or 'auto', got {value!r}") from None


def describe(sweep: SweepConfig) -> str:
    grid = cells(sweep)
    lines = [f"{len(grid)} cells (sbatch --array=0-{len(grid) - 1} launch/compress_sweep_array.sbatch):"]
    lines += [
        f"  {c.index}: {c.name} (LM {c.lm.name}{', ' + c.lm.path if c.lm.path else ''}, M={c.tokens})" for c in grid
    ]
    return "\n".join(lines)
