"""The `aimv2 compress` schema, loaded with `aimv2.config.load_config(path, overrides, schema=CompressConfig)`.

The sequence the LLM sees is `[text.prefix] [M visual tokens] [text.prompt] [caption]`: image
tokens come before the text; only caption tokens are predicted (prefix, visual and prompt
positions carry label -100). `text.prefix` does not depend on the image, so its KV cache is
computed once and shared by every image (see aimv2/compress/vlm.py).

The `aimv2 compress sweep` schema, loaded with `aimv2.config.load_config(path, overrides, schema=SweepConfig)`.

A sweep is a grid of cells, LMs x M visual tokens; every cell is one `aimv2 compress train` run of
the `compress` config with the LM's and the cell's values set over it, then one evaluation. Each
cell trains on one device (`trainer.devices=1`): a cluster runs the cells side by side, one SLURM
array task per cell (launch/compress_sweep_array.sbatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aimv2.config import TokenizerConfig, TrainerConfig, check, check_lr_schedule
from aimv2.errors import UserError

LM_ARCHS = ("llama", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EncoderSection:
    # required to train: what the encoder loader takes, e.g. an `aimv2 pretrain` checkpoint RUN/checkpoints/last.ckpt
    source: str = ""
    img_size: int = 0  # 0 = the encoder's own resolution

    def validate(self) -> None:
        check(self.img_size >= 0, "img_size", "must be >= 0 (0 = the encoder's)")


@dataclass
class CompressorSection:
    kind: str = "pool"  # mlp | pool | resampler | tokenpacker | quecc | kdv
    num_tokens: int = 16  # M visual tokens; 0 = all N (mlp keeps all N)
    hidden: int = 0  # MLP hidden width (default: LLM width) / attention width (default: encoder width)
    heads: int = 4  # attention heads (resampler, tokenpacker, quecc)
    layers: int = 2  # Perceiver Resampler layers (resampler)
    train_tokens: list[int] = field(default_factory=list)  # pool/kdv: draw M per step from this list (Matryoshka-style)
    init: str = ""  # start from the compressor of this checkpoint / run dir / bundle (e.g. stage 1 before stage 2)

    def validate(self) -> None:
        from aimv2.compress.components import (
            COMPRESSORS,  # the registry imports the compressors, which read this config
        )

        check(self.kind in COMPRESSORS, "kind", f"unknown compressor {self.kind!r} (one of {', '.join(COMPRESSORS)})")
        check(self.num_tokens >= 0, "num_tokens", "must be >= 0 (0 = all patches)")
        check(self.hidden >= 0 and self.heads >= 1 and self.layers >= 1, "", "hidden >= 0, heads >= 1, layers >= 1")
        check(
            not self.train_tokens or self.kind in ("pool", "kdv"),
            "train_tokens",
            f"only pool and kdv can change M during training, not {self.kind}",
        )
        check(all(m >= 1 for m in self.train_tokens), "train_tokens", "values must be >= 1")


@dataclass
class LMSection:
    path: str = (
        ""  # a local Hugging Face model directory (AutoModelForCausalLM, local_files_only); "" = random init below
    )
    arch: str = "llama"  # random init: llama | qwen2
    hidden_size: int = 64  # random init: the LM's width
    num_layers: int = 2  # random init: decoder layers
    num_heads: int = 4  # random init: attention heads (as many key-value heads); must divide hidden_size
    intermediate_size: int = 128  # random init: the MLP's hidden width
    max_positions: int = 512  # random init: the LM config's max_position_embeddings (longest sequence)
    init_std: float = 0.02  # random init: weight std (HF's default 0.02 leaves a frozen tiny LM's outputs near uniform)
    seed: int = 0  # seeds the random init (the weights are also stored in checkpoints and bundles)
    dtype: str = "float32"  # float32 on CPUs; bfloat16 on GPUs

    def validate(self) -> None:
        check(self.arch in LM_ARCHS, "arch", f"must be one of {', '.join(LM_ARCHS)}, got {self.arch!r}")
        check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(
            min(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size, self.max_positions) >= 1,
            "",
            "sizes must be >= 1",
        )
        check(0 < self.init_std <= 1, "init_std", f"must be within (0, 1], got {self.init_std}")
        check(self.hidden_size % self.num_heads == 0, "num_heads", f"must divide lm.hidden_size={self.hidden_size}")


@dataclass
class TextSection:
    prefix: str = ""  # text before the image tokens (system prompt, or the question in query-first use); KV-cached
    prompt: str = ""  # text after the image tokens, before the caption (e.g. "Caption:"); not predicted
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # kind clip|hf; vocab must match the LM

    def validate(self) -> None:
        kind = self.tokenizer.kind
        check(kind in ("clip", "hf"), "tokenizer.kind", f"must be 'clip' or 'hf', got {kind!r}")


@dataclass
class CompressDataSection:
    # required to train: image-caption shards (brace pattern, '::' joins several), e.g. /data/cc/{00000..00099}.tar
    train: str = ""
    val: str = ""  # held-out image-caption shards for `aimv2 compress evaluate`
    batch_size: int = 16  # per device
    num_workers: int = 2  # data-loading worker processes per device; 0 = load in the training process
    shuffle_buffer: int = 500  # samples; 0 disables
    seed: int = 0  # the training stream's randomness: shard draws and shuffle

    def validate(self) -> None:
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class CompressOptimSection:
    lr: float = 1e-3  # LLaVA stage 1: 1e-3 for the projector
    min_lr: float = 1e-5  # the cosine decay's floor, reached at the run's last optimizer step
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's [beta1, beta2]
    eps: float = 1e-8  # AdamW's epsilon (added to the root of the second moment)
    weight_decay: float = 0.0  # fully decoupled, as in pre-training: weights shrink by this x lr_t / lr per step
    warmup_steps: int = 30  # optimizer steps of linear warmup to lr, then cosine to min_lr
    grad_clip: float = 1.0  # 0 disables
    lm_lr_scale: float = 0.125  # stage 2: the LLM's lr = lr * this (AIMv2's VLM: connector lr 8x the LLM's)

    def validate(self) -> None:
        check_lr_schedule(self.lr, self.min_lr, self.betas, self.weight_decay)
        check(self.lm_lr_scale > 0, "lm_lr_scale", "must be > 0")


@dataclass
class CompressConfig:
    run_dir: str = "runs/compress"  # the run's directory: config, checkpoints, logs (aimv2.engine.run_dir)
    stage: int = 1  # 1: only the compressor trains (LLaVA alignment); 2: compressor + LLM
    encoder: EncoderSection = field(default_factory=EncoderSection)  # the frozen vision encoder
    compressor: CompressorSection = field(default_factory=CompressorSection)  # encoder tokens -> M LLM tokens
    lm: LMSection = field(default_factory=LMSection)  # the language model: a local directory or a random one
    text: TextSection = field(default_factory=TextSection)  # the text around the visual tokens, the tokenizer
    data: CompressDataSection = field(default_factory=CompressDataSection)  # image-caption shards
    optim: CompressOptimSection = field(default_factory=CompressOptimSection)  # AdamW, warmup-cosine schedule
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # devices, strategy, precision, length, checkpoints

    def validate(self) -> None:
        check(self.stage in (1, 2), "stage", f"must be 1 (compressor only) or 2 (compressor + LLM), got {self.stage}")
        # The alignment module has no configure_model hook, which Lightning's ModelParallelStrategy needs.
        check(
            self.trainer.strategy != "fsdp2",
            "trainer.strategy",
            "fsdp2 shards pre-training only; align compressors with ddp, fsdp or deepspeed",
        )

    def require(self, *keys: str) -> None:
        """A UserError naming the first of these dotted keys that is empty (what a verb needs set)."""
        for key in keys:
            value = self
            for part in key.split("."):
                value = getattr(value, part)
            if not value:
                raise UserError(f"config key '{key}': required (set it in the config file or as {key}=...)")


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
