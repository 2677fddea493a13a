"""The pre-training schema: typed dataclasses; values come from YAML files and `key=value` overrides.

Each section checks its own values in `validate()` (called section by section by
aimv2.config.load_config) and each component receives only its own section (`ModelConfig`,
`DataConfig`, ...), never the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aimv2.errors import check


@dataclass
class ModelConfig:
    size: str = "debug"  # a row of aimv2.models.sizes.SIZES
    img_size: int = 224  # a multiple of the patch size (14)
    init_from: str | None = None  # start from this checkpoint's weights, not a resume (aimv2.pretraining.init_from)
    # Native resolution (aimv2.models.native): images at their own aspect ratio, 2-D sin-cos positions,
    # packed rows under a token budget (data.native); img_size is then only the nominal size.
    native: bool = False
    attention: str = "auto"  # packed rows: "auto" (FlexAttention on CUDA, dense masked SDPA elsewhere), "sdpa", "flex"

    def validate(self) -> None:
        from aimv2.models.sizes import get_size

        spec = get_size(self.size)
        check(
            self.img_size % spec.patch_size == 0,
            "img_size",
            f"{self.img_size} is not a multiple of the patch size {spec.patch_size}",
        )
        check(
            self.attention in ("auto", "sdpa", "flex"),
            "attention",
            f"must be 'auto', 'sdpa' or 'flex', got {self.attention!r}",
        )


@dataclass
class SourceConfig:
    urls: str = "???"  # brace-expanded shard list, e.g. /data/cc/{00000..00127}.tar ('::' joins lists)
    weight: float = 1.0  # sampling weight in resampled mode
    name: str = ""  # a label ("" = source0, source1, ...); saved with the data position: renaming it changes the data

    def validate(self) -> None:
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


TOKENIZER_KINDS = ("clip", "hf", "words")


@dataclass
class TokenizerConfig:
    kind: str = (
        "clip"  # "clip": open_clip's BPE shipped in its wheel (offline); "hf": a local directory; "words": a word list
    )
    path: str | None = None  # kind=hf: directory holding tokenizer.json / tokenizer_config.json; kind=words: the list
    max_length: int = 77  # tokens per caption, end-of-text included

    def validate(self) -> None:
        """The path is checked by the job that needs it (pre-training at load time, compress when it
        builds the tokenizer: a rehearsal may stand in for a missing one)."""
        check(self.kind in TOKENIZER_KINDS, "kind", f"must be 'clip', 'hf' or 'words', got {self.kind!r}")
        check(self.max_length >= 2, "max_length", "must be >= 2")


@dataclass
class NativeDataConfig:
    """Batches of a native-resolution run (model.native; aimv2.data.native): every image keeps its aspect
    ratio with between min_patches and max_patches patches; images are packed, first-fit decreasing,
    into rows of `row_tokens` encoder tokens. Resampled mode: `rows` rows per batch (the batch's token
    budget is rows x row_tokens), packed over windows of `window` samples. Epoch mode: a batch is
    data.batch_size images in as many rows as they need, so that every rank plans the same number of
    steps from sample counts and each sample is seen once per epoch (tokens per step then vary)."""

    min_patches: int = 112  # an image of fewer patches is scaled up to at least this many
    max_patches: int = 1024  # an image of more patches is scaled down to at most this many
    # Rows of max_patches: 3.2% padding on a web-like mix; longer rows pack tighter (4x: 1.8%) but dense
    # masked SDPA (the CPU path) computes every row's full T x T (benchmarks/results/native_packing.md).
    row_tokens: int = 1024
    rows: int = 16  # resampled mode: rows per batch per device (a budget of rows x row_tokens tokens)
    window: int = 256  # samples packed together: larger packs tighter and holds more decoded images

    def validate(self) -> None:
        check(
            2 <= self.min_patches <= self.max_patches,
            "min_patches",
            f"need 2 <= min_patches <= max_patches, got {self.min_patches} and {self.max_patches}",
        )
        check(
            self.row_tokens >= self.max_patches,
            "row_tokens",
            f"{self.row_tokens} cannot hold an image of max_patches={self.max_patches}",
        )
        check(self.rows > 0 and self.window > 0, "rows", "rows and window must be > 0")


@dataclass
class ValConfig:
    """The held-out validation loss of pre-training (aimv2.pretraining.validation): the training
    objective, deterministic (resize + center crop, fixed per-sample prefix lengths), on a fixed set of
    held-out samples, every `every_n_steps` optimizer steps and at the last step."""

    urls: str = ""  # held-out shards, the syntax of data.sources[].urls; "" = no validation
    every_n_steps: int = 1000  # optimizer steps between evaluations, plus the last step; 0 = the last step only
    max_samples: int = 0  # the first N samples of the shards (in listed order) form the set; 0 = all of them
    batch_size: int = 0  # per device; 0 = data.batch_size
    num_workers: int = 0  # loader workers per device during an evaluation; 0 = in the training process

    def validate(self) -> None:
        check(
            self.every_n_steps >= 0,
            "every_n_steps",
            f"must be >= 0 (0: only at the last step), got {self.every_n_steps}",
        )
        check(self.max_samples >= 0, "max_samples", f"must be >= 0 (0: every sample), got {self.max_samples}")
        check(self.batch_size >= 0, "batch_size", f"must be >= 0 (0: data.batch_size), got {self.batch_size}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # shard sources; resampled mode mixes them by weight.
    mode: str = "resampled"  # "resampled": infinite, shards drawn with replacement; "epoch": each sample once per epoch
    batch_size: int = 8  # per device
    num_workers: int = 2  # data-loading worker processes per device; 0 = load in the training process
    shuffle_buffer: int = 1000  # samples; 0 disables
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # random crop's [min, max] fraction of the area
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # random crop's [min, max] width / height
    hflip: float = 0.5  # probability of a horizontal flip per image
    seed: int = 0  # the data's randomness: shard order and draws, shuffle, crops, flips, prefix lengths
    # A resume over changed data (a shard renamed, resized, recounted, added or removed; the sources or their
    # weights): "error" stops with the shard named; "restart" starts the epoch afresh on the data as it is now.
    on_change: str = "error"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # the captions' tokenizer
    native: NativeDataConfig = field(default_factory=NativeDataConfig)  # used when model.native
    val: ValConfig = field(default_factory=ValConfig)  # held-out validation loss; off while val.urls is ""

    def validate(self) -> None:
        check(len(self.sources) > 0, "sources", "no shard sources given (list of {urls, weight})")
        check(self.mode in ("resampled", "epoch"), "mode", f"must be 'resampled' or 'epoch', got {self.mode!r}")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(
            self.on_change in ("error", "restart"), "on_change", f"must be 'error' or 'restart', got {self.on_change!r}"
        )
        tok = self.tokenizer
        check(tok.kind == "clip" or bool(tok.path), "tokenizer.path", f"required for kind={tok.kind}")
        check(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_scale",
            f"must be [min, max] within (0, 1], got {self.crop_scale}",
        )


@dataclass
class ObjectiveConfig:
    alpha: float = 0.4  # weight of the image loss; 0 = captioning-only baseline
    text_weight: float = 1.0  # weight of the text loss; 0 = image-only (AIMv1-like)
    # Prefix attention in the encoder during pre-training (a random prefix M, causal after it). false: the
    # encoder attends bidirectionally, as at inference and as captioning baselines (CapPa) train it; the
    # image loss (next patch outside the prefix) then has no targets, so false needs alpha = 0.
    prefix_attention: bool = True

    def validate(self) -> None:
        check(self.alpha >= 0 and self.text_weight >= 0, "", "alpha and text_weight must be >= 0")
        check(self.alpha + self.text_weight > 0, "", "alpha and text_weight are both 0")
        check(
            self.prefix_attention or self.alpha == 0,
            "prefix_attention",
            f"false needs objective.alpha=0 (got {self.alpha:g}): the image loss is defined only for the "
            "non-prefix patches of a prefix-causal encoder",
        )


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak; 0 is allowed (with min_lr 0): nothing moves, neither update nor decay
    min_lr: float = 1e-5  # the cosine decay's floor, reached at the run's last optimizer step
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's [beta1, beta2]
    eps: float = 1e-8  # AdamW's epsilon (added to the root of the second moment)
    # The paper's lambda, fully decoupled (ml-l3m's AdamLH): every step a decayed weight is multiplied
    # by 1 - weight_decay * lr_t / lr, i.e. torch AdamW with weight_decay / lr (aimv2.engine.optim).
    # Not applied to norms, biases, position embeddings, start token.
    weight_decay: float = 1e-4
    warmup_steps: int = 12_500  # optimizer steps of linear warmup from warmup_start_lr to lr, then cosine
    # The lr at step 0, rising linearly to lr at step warmup_steps (ml-l3m's LinearParamScheduler start_value).
    warmup_start_lr: float = 1e-6
    grad_clip: float = 1.0  # 0 disables

    def validate(self) -> None:
        check_lr_schedule(self.lr, self.min_lr, self.betas, self.weight_decay)
        check(self.warmup_start_lr >= 0, "warmup_start_lr", f"must be >= 0, got {self.warmup_start_lr:g}")


def check_lr_schedule(lr: float, min_lr: float, betas: list[float], weight_decay: float) -> None:
    """The checks every AdamW + warmup-cosine section shares (pre-training, compress)."""
    check(len(betas) == 2, "betas", "must be two numbers")
    check(lr >= 0, "lr", f"must be >= 0 (0: nothing trains), got {lr:g}")
    check(0 <= min_lr <= lr, "min_lr", f"must be within [0, optim.lr={lr:g}], got {min_lr:g}")
    check(weight_decay >= 0, "weight_decay", f"must be >= 0, got {weight_decay:g}")


STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed", "fsdp2")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # Lightning's accelerator: "auto", "cpu", "gpu"
    devices: Any = "auto"  # processes (devices) per node: a count, a list of device indices, or "auto" (all)
    num_nodes: int = 1  # machines; the run has num_nodes x devices processes
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed | fsdp2; presets in configs/strategy/ (aimv2.engine.trainer)
    zero_stage: int = 2  # deepspeed: ZeRO stage 2 (optimizer + gradients sharded) or 3 (+ parameters)
    offload: bool = False  # deepspeed: optimizer states (stage 3: and parameters) in CPU memory; fsdp: parameters
    activation_checkpointing: bool = False  # recompute every transformer block in backward (encoder and decoder)
    accumulate_grad_batches: int = 1  # batches per optimizer step
    compile: bool = False  # torch.compile every transformer block
    precision: str = "32-true"  # bf16-mixed on GPUs; keep fp32 on CPUs
    max_steps: int = -1  # optimizer steps to train (also the LR schedule's length); -1: none (epoch mode only)
    max_epochs: int | None = None  # epoch mode: passes over the data; unset: until max_steps
    log_every_n_steps: int = 10  # optimizer steps between logged metric rows (metrics.csv, TensorBoard)
    checkpoint_every_n_steps: int = 1000  # optimizer steps between step=N checkpoints (last.ckpt with each)
    keep_checkpoints: int = 3  # newest step=N checkpoints kept (plus last.ckpt); -1 keeps all
    max_nonfinite_steps: int = 10  # steps in a row with a NaN/inf loss or gradient (each skipped) before stopping
    seed: int = 0  # global seed (seed_everything): weight initialization; the data's randomness is data.seed
    resume: str | None = None  # checkpoint path, "auto" (newest intact in run_dir), "none"; unset: auto under SLURM
    overwrite: bool = False  # start afresh in a run_dir that holds another run, deleting its checkpoints and logs
    log_samples: bool = False  # write the keys of every consumed sample to RUN/logs/samples/rank*.tsv
    progress_bar: bool = True  # a bar on a terminal, else progress lines (docs/monitoring.md); false: none

    def validate(self) -> None:
        """Every job that trains through aimv2.engine (pre-training, compress) gets these checks."""
        check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check(
            self.strategy not in ("fsdp", "deepspeed") or self.accelerator != "cpu",
            "strategy",
            f"{self.strategy} needs GPUs (Lightning refuses it on the CPU accelerator): set trainer.accelerator=gpu",
        )
        check(self.zero_stage in (2, 3), "zero_stage", f"must be 2 or 3, got {self.zero_stage}")
        check(
            not self.offload or self.strategy in ("deepspeed", "fsdp"),
            "offload",
            f"needs trainer.strategy=deepspeed or fsdp, got {self.strategy!r}",
        )
        check(self.accumulate_grad_batches >= 1, "accumulate_grad_batches", "must be >= 1")
        check(self.checkpoint_every_n_steps > 0, "checkpoint_every_n_steps", "must be > 0")
        check(
            self.keep_checkpoints == -1 or self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1, or -1 (all)"
        )
        check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")


@dataclass
class VisualizeConfig:
    every_n_steps: int = 1000  # a prediction grid every N optimizer steps (plus step 0 and the last); 0 disables
    num_images: int = 4  # samples of the fixed batch (the first training batch) shown
    prefix_ratio: float = 0.5  # prefix length M = round(ratio * patches), within [1, N-1]
    max_caption_tokens: int = 20  # greedy caption length limit; 0: no captions
    images: list[str] = field(default_factory=list)  # image files/dirs to show instead of the first batch

    def validate(self) -> None:
        check(self.every_n_steps >= 0, "every_n_steps", f"must be >= 0 (0 disables), got {self.every_n_steps}")
        check(self.num_images >= 1, "num_images", f"must be >= 1, got {self.num_images}")
        check(0 < self.prefix_ratio < 1, "prefix_ratio", f"must be within (0, 1), got {self.prefix_ratio}")
        check(
            self.max_caption_tokens >= 0,
            "max_caption_tokens",
            f"must be >= 0 (0: no captions), got {self.max_caption_tokens}",
        )


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"  # the run's directory: config, checkpoints, logs, pictures (aimv2.engine.run_dir)
    model: ModelConfig = field(default_factory=ModelConfig)  # the encoder and decoder
    data: DataConfig = field(default_factory=DataConfig)  # shards, augmentation, tokenizer, validation set
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # the losses and their weights
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the warmup-cosine schedule
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # devices, strategy, precision, length, checkpoints
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)  # prediction grids during training

    def validate(self) -> None:
        """What depends on two sections: how the run ends for the data mode."""
        t = self.trainer
        if self.data.mode == "resampled":
            check(t.max_steps > 0, "trainer.max_steps", "must be > 0 in resampled (infinite) data mode")
        else:
            check(
                t.max_steps > 0 or (t.max_epochs or 0) > 0,
                "trainer.max_epochs",
                "set trainer.max_epochs or trainer.max_steps in epoch data mode",
            )
        check(
            not (self.model.native and self.data.val.urls),
            "data.val.urls",
            "the held-out validation loss does not support native-resolution runs (model.native) yet; "
            "set data.val.urls=''",
        )
