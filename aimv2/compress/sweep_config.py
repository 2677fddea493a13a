"""The `aimv2 compress sweep` schema, loaded with `aimv2.config.load_config(path, overrides, schema=SweepConfig)`.

A sweep is a grid of cells, LMs x M visual tokens; every cell is one `aimv2 compress train` run of
the `compress` config with the LM's and the cell's values set over it, then one evaluation. Each
cell trains on one device (`trainer.devices=1`): a cluster runs the cells side by side, one SLURM
array task per cell (launch/compress_sweep_array.sbatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aimv2.errors import check


@dataclass
class SweepLM:
    name: str = "???"  # names the cell directories and the rows of results.csv, e.g. qwen1.5-0.5b
    path: str = ""  # a local Hugging Face model directory (sets lm.path); "" = the random LM of `overrides`
    overrides: list[str] = field(default_factory=list)  # key=value for this LM's cells, e.g. lm.hidden_size=128,
    #                                                     text.tokenizer.path=/models/qwen (the LM's own tokenizer)

    def validate(self) -> None:
        check(
            bool(self.name) and "/" not in self.name and not self.name.startswith("."),
            "name",
            f"must be a plain directory name, got {self.name!r}",
        )
        check(all("=" in o for o in self.overrides), "overrides", "items must be key=value")


@dataclass
class SweepEval:
    val: str = ""  # held-out image-caption shards; "" = the compress config's data.val
    batch_size: int = 32  # held-out samples per evaluation batch
    num_workers: int = 2  # data-loading worker processes; 0 = load in the evaluating process
    max_batches: int = 0  # stop after this many batches per cell (0 = every held-out sample)
    device: str = "cpu"  # cpu or cuda

    def validate(self) -> None:
        check(
            self.batch_size > 0 and self.num_workers >= 0 and self.max_batches >= 0,
            "",
            "batch_size > 0, num_workers >= 0, max_batches >= 0",
        )


@dataclass
class SweepFit:
    text_tokens: list[int] = field(default_factory=lambda: [0, 50])  # Q of the cost 2 N (Q + V)
    budgets: list[float] = field(default_factory=list)  # inference FLOPs per query; [] = spread over the sweep's
    bootstrap: int = 200  # resamples for the parameters' uncertainty
    seed: int = 0  # the bootstrap's resampling

    def validate(self) -> None:
        check(bool(self.text_tokens) and min(self.text_tokens) >= 0, "text_tokens", "a list of Q >= 0")
        check(all(b > 0 for b in self.budgets), "budgets", "must be > 0")
        check(self.bootstrap >= 0, "bootstrap", "must be >= 0")


@dataclass
class SweepConfig:
    compress: str = "???"  # the `aimv2 compress train` config every cell starts from
    out: str = "runs/compress/sweep"  # cells/<lm>_m<M>/ (run dirs), results.csv, fit/
    overrides: list[str] = field(default_factory=list)  # key=value applied to every cell (before the LM's)
    lms: list[SweepLM] = field(default_factory=list)  # the LMs, at least two sizes: one row of cells each.
    tokens: list[int] = field(default_factory=lambda: [1, 4, 16])  # M visual tokens per cell
    eval: SweepEval = field(default_factory=SweepEval)  # each cell's evaluation on held-out captions
    fit: SweepFit = field(default_factory=SweepFit)  # the scaling-law fit over the cells (docs/scaling-laws.md)

    def validate(self) -> None:
        # The law's exponents need two values of each of N and V, and its 4 parameters at least 4 cells.
        check(
            len(self.lms) >= 2,
            "lms",
            "name at least two LMs ({name, path} or {name, overrides}): the N exponent needs two sizes",
        )
        check(len(self.tokens) >= 2, "tokens", f"needs at least two values of M (the V exponent), got {self.tokens}")
        names = [lm.name for lm in self.lms]
        check(len(set(names)) == len(names), "lms", f"LM names must be distinct, got {names}")
        check(bool(self.tokens) and min(self.tokens) >= 1, "tokens", f"a list of M >= 1, got {self.tokens}")
        check(len(set(self.tokens)) == len(self.tokens), "tokens", f"values must be distinct, got {self.tokens}")
        check(all("=" in o for o in self.overrides), "overrides", "items must be key=value")
