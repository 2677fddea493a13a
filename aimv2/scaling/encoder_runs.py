"""Reading a ladder of `aimv2 pretrain` runs into (N, D, C, L) points for the encoder scaling law.

A point is one logged held-out validation loss of a run: L = `val/loss`, D = `val/train_samples`
(global samples consumed; every sample has the same number of patches at a fixed img_size, so samples
are the natural data axis), C = `val/train_flops`, N = the encoder's parameter count (the part that
is deployed), counted exactly by building the model on the meta device (no memory, no init cost).

The config is read as plain YAML, not through the schema: a ladder may span versions of the schema
(keys added or removed since a run was made), and only a handful of keys matter here.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from aimv2.config.schema import ModelConfig, TokenizerConfig
from aimv2.engine.logs import read_metrics
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError

CLIP_VOCAB = 49408  # open_clip's BPE vocabulary (aimv2.data.tokenizer.ClipTokenizer), without loading it
VAL_COLUMNS = ("val/loss", "val/train_samples", "val/train_flops", "val/loss_img", "val/loss_text")


@dataclass(frozen=True)
class RunSettings:
    """What of a run's config.yaml the law needs."""

    size: str
    img_size: int
    native: bool
    text_len: int  # data.tokenizer.max_length: the decoder's text positions
    vocab: int | None  # None: the tokenizer could not be read (then only logged FLOPs can be used)
    vocab_note: str  # why vocab is None, or ""


@dataclass(frozen=True)
class Point:
    """One validation point of a run: the unit of every fit."""

    run: str  # the run directory as given
    settings: RunSettings
    step: int
    n_encoder: int
    n_total: int | None  # encoder + decoder (None when the vocabulary is unknown)
    samples: float  # D
    flops: float  # C
    flops_logged: bool  # False: samples x training_flops_per_sample (an estimate)
    val_loss: float  # L
    samples_per_step: float | None  # the run's global batch (from the log), for steps <-> samples
    held_out: bool = False

    @property
    def size(self) -> str:
        return self.settings.size

    @property
    def k(self) -> float:
        """FLOPs per sample per encoder parameter (C = k N D)."""
        return self.flops / (self.n_encoder * self.samples)


# -- parameter counts ----------------------------------------------------------------------------


@cache
def encoder_params(size: str, img_size: int, native: bool = False) -> int:
    """Exact parameter count of the deployed encoder of a size (built on the meta device)."""
    import torch

    from aimv2.models.encoder import build_encoder
    from aimv2.models.native import build_native_encoder
    from aimv2.models.sizes import get_size

    spec = get_size(size)
    with torch.device("meta"):
        encoder = build_native_encoder(spec, img_size) if native else build_encoder(spec, img_size)
    return sum(p.numel() for p in encoder.parameters())


@cache
def total_params(size: str, img_size: int, vocab: int, text_len: int, native: bool = False) -> int:
    """Encoder + decoder parameters, the model pre-training builds (aimv2.pretraining.module)."""
    import torch

    from aimv2.models import AIMv2, get_size

    with torch.device("meta"):
        model = AIMv2(get_size(size), img_size, vocab, text_len, native=native)
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(size: str, img_size: int, text_len: int, vocab: int) -> float:
    """Training FLOPs of one sample, charging the vocabulary head for every text position (the real
    caption lengths are not in the logs: an over-estimate of the head's share)."""
    from aimv2.models.sizes import get_size, training_flops_per_sample

    return training_flops_per_sample(get_size(size), img_size, text_len, text_len, vocab)["total"]


# -- one run -------------------------------------------------------------------------------------


def _select(cfg: Any, key: str, default: Any, config: Path) -> Any:
    """A key of a run's config, the schema's default when absent (a config written by an older version)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, key, default=default)
    except OmegaConfBaseException as err:  # an unresolvable interpolation, a missing mandatory value
        raise UserError(f"{config}: cannot read {key}: {str(err).splitlines()[0]}") from None
    return default if value is None else value


def _vocab_of(kind: str, path: str | None, text_len: int) -> tuple[int | None, str]:
    """The tokenizer's vocabulary size: CLIP's is known; others are read from their files."""
    if kind == "clip":
        return CLIP_VOCAB, ""
    if kind not in ("hf", "words") or not path:
        return None, f"data.tokenizer.kind={kind} with path={path!r}"
    from aimv2.data.tokenizer import build_tokenizer

    try:
        return build_tokenizer(TokenizerConfig(kind=kind, path=path, max_length=text_len)).vocab_size, ""
    except Exception as err:  # a missing directory or word list, transformers absent: say so where it matters
        return None, f"data.tokenizer ({kind}, {path}): {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def read_settings(run: RunDir) -> RunSettings:
    """model.size, model.img_size, model.native, the tokenizer of a run's config.yaml."""
    from omegaconf import DictConfig, OmegaConf

    from aimv2.models.sizes import SIZES

    try:
        cfg = OmegaConf.load(run.config)
    except Exception as err:
        raise UserError(f"{run.config}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{run.config}: not a pre-training config (expected a mapping with model and data)")
    model, tok = ModelConfig(), TokenizerConfig()
    size = str(_select(cfg, "model.size", model.size, run.config))
    if size not in SIZES:
        raise UserError(f"{run.config}: model.size={size!r} is not a row of the size table ({', '.join(SIZES)})")
    try:
        img_size = int(_select(cfg, "model.img_size", model.img_size, run.config))
        text_len = int(_select(cfg, "data.tokenizer.max_length", tok.max_length, run.config))
    except (TypeError, ValueError):
        raise UserError(f"{run.config}: model.img_size and data.tokenizer.max_length must be integers") from None
    kind = str(_select(cfg, "data.tokenizer.kind", tok.kind, run.config))
    vocab, note = _vocab_of(kind, _select(cfg, "data.tokenizer.path", None, run.config), text_len)
    native = bool(_select(cfg, "model.native", model.native, run.config))
    return RunSettings(size, img_size, native, text_len, vocab, note)


def _by_step(series: list[tuple[int, float]]) -> dict[int, float]:
    """step -> value; a step logged twice (a resumed run re-logging it) keeps the later row."""
    return dict(series)


def _samples_per_step(samples: dict[int, float]) -> float | None:
    """The global batch: samples per optimizer step between the last two val points (exact), else from
    the last one alone. The validation row of the K-th optimizer step is Lightning's 0-based row K-1
    (aimv2.pretraining.validation), so samples / (row + 1); a log that numbers rows by K divides by row."""
    steps = sorted(samples)
    if len(steps) >= 2 and samples[steps[-1]] > samples[steps[-2]]:
        return (samples[steps[-1]] - samples[steps[-2]]) / (steps[-1] - steps[-2])
    if not steps or samples[steps[-1]] <= 0:
        return None
    last, value = steps[-1], samples[steps[-1]]
    for optimizer_steps in (last + 1, last):
        if optimizer_steps > 0 and value % optimizer_steps == 0:
            return value / optimizer_steps
    return value / (last + 1)


def read_run(path: str, points: str = "last") -> list[Point]:
    """The validation point(s) of one run directory: the final one (default: intermediate points of a
    cosine schedule sit above the loss a run of that length would reach, Chinchilla sec. 3.1) or,
    with points="all", every logged one. Mistakes are one-line UserErrors naming the run."""
    run = RunDir(path)
    if not run.root.is_dir():
        raise UserError(f"{path}: not a directory (expected an `aimv2 pretrain` run directory)")
    if not run.config.is_file():
        raise UserError(f"{path}: no config.yaml (not an `aimv2 pretrain` run directory)")
    if not run.metrics.is_file():
        raise UserError(f"{path}: no logs/metrics.csv (the run has logged nothing yet)")
    settings = read_settings(run)
    try:
        series = read_metrics(run.metrics, VAL_COLUMNS)
    except (KeyError, ValueError, OSError) as err:
        raise UserError(f"{run.metrics}: not a readable metrics.csv ({type(err).__name__}: {err})") from None
    loss, samples, flops = (_by_step(series[c]) for c in ("val/loss", "val/train_samples", "val/train_flops"))
    if not loss:
        raise UserError(
            f"{path}: no val/loss in logs/metrics.csv: pre-train with data.val.urls set (the held-out validation loss)"
        )
    batch = _samples_per_step(samples)
    n_encoder = encoder_params(settings.size, settings.img_size, settings.native)
    n_total = (
        total_params(settings.size, settings.img_size, settings.vocab, settings.text_len, settings.native)
        if settings.vocab
        else None
    )
    steps = sorted(loss)
    chosen = steps[-1:] if points == "last" else steps
    out = []
    for step in chosen:
        value = loss[step]
        if not math.isfinite(value) or value <= 0:
            raise UserError(
                f"{path}: val/loss at step {step} is {value}: not a finite positive loss "
                "(a diverged run does not belong in a scaling fit)"
            )
        d, c = samples.get(step), flops.get(step)
        logged = c is not None
        if d is None and c is None:
            if points == "all":
                continue  # an intermediate point without its x: skipped
            raise UserError(
                f"{path}: neither val/train_samples nor val/train_flops logged at step {step} (the final val/loss)"
            )
        if c is None or d is None:
            if settings.vocab is None:
                missing = "val/train_flops" if c is None else "val/train_samples"
                raise UserError(
                    f"{path}: {missing} not logged at step {step} and the vocabulary size is unknown "
                    f"({settings.vocab_note}): cannot compute it"
                )
            per_sample = flops_per_sample(settings.size, settings.img_size, settings.text_len, settings.vocab)
            d = c / per_sample if d is None else d
            c = d * per_sample if c is None else c
        if d <= 0 or c <= 0:
            if points == "all":
                continue  # the step-0 validation: no training yet, no place on a log axis
            raise UserError(f"{path}: val/train_samples={d:g}, val/train_flops={c:g} at step {step}: nothing trained")
        out.append(Point(path, settings, step, n_encoder, n_total, float(d), float(c), logged, float(value), batch))
    return out


def _same_dir(path: str) -> Path:
    return Path(path).resolve()


def read_ladder(paths: list[str], points: str = "last") -> list[Point]:
    """Every run's point(s), in the order given; a run directory given twice is an error."""
    if points not in ("last", "all"):
        raise UserError(f"points must be 'last' or 'all', got {points!r}")
    seen: dict[Path, str] = {}
    for path in paths:
        key = _same_dir(path)
        if key in seen:
            raise UserError(f"{path}: duplicate run directory (also given as {seen[key]})")
        seen[key] = path
    return [p for path in paths for p in read_run(path, points)]


def common_value(values: list) -> Any:
    """The most common of a ladder's settings (img_size, batch): one figure for the recommendations."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None
