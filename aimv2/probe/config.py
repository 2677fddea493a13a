"""The `aimv2 probe` schema: typed dataclasses loaded with `aimv2.config.load_config(..., schema=ProbeConfig)`;
each section checks its own values in `validate()`.

Defaults are the quick cached mode (features of unaugmented images extracted once, heads train
for many epochs in seconds); `configs/probe/imagenet_attentive.yaml` holds the paper's protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aimv2.engine.run_dir import RunDir
from aimv2.errors import check

PAPER_LRS = [5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3]
PAPER_WDS = [0.05, 0.1]
HEAD_KINDS = ("attentive", "linear")
MODES = ("cached", "augmented")
CACHE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ProbeDataConfig:
    train: str = (
        "???"  # class folders (train/<class>/<img>) or class shards (dir with classes.json, or a brace pattern)
    )
    val: str = "???"  # the split every head is scored on
    # Choosing the best head of each kind on a split apart from the scored one (cached mode): chosen on val,
    # the reported top-1 is the best of the grid's noisy val scores, biased upwards. Either a split of its
    # own (the syntax of train and val), or a class-stratified fraction of train held out from head training
    # (the same rows for the same train split and seed). Neither: heads are chosen on val (selected_on: val).
    select: str = ""
    select_fraction: float = 0.0  # e.g. 0.2: a fifth of each class of train chooses, the rest trains
    batch_size: int = 64  # per device (the paper: 1024); small sets want small batches (more steps)
    num_workers: int = 2  # dataloader workers per device
    shuffle_buffer: int = 1000  # augmented mode on shards: samples in the shuffle buffer

    def validate(self) -> None:
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(0 <= self.select_fraction < 1, "select_fraction", f"must be within [0, 1), got {self.select_fraction:g}")
        check(
            not (self.select and self.select_fraction),
            "select_fraction",
            "choose heads on data.select or on data.select_fraction of train, not both",
        )


@dataclass
class ProbeHeadConfig:
    kinds: list[str] = field(default_factory=lambda: ["attentive", "linear"])  # each kind gets the whole grid
    blocks: list[int] = field(default_factory=list)  # [] = last block (normed); else average of these blocks (normed)
    attention_heads: int = 0  # attentive pooling heads; 0 = the encoder's own number of heads (AIMv1/AIMv2 protocol)

    def validate(self) -> None:
        check(
            len(self.kinds) > 0 and all(k in HEAD_KINDS for k in self.kinds),
            "kinds",
            f"must be a non-empty list of {', '.join(HEAD_KINDS)}, got {self.kinds}",
        )
        check(len(set(self.kinds)) == len(self.kinds), "kinds", "lists a kind twice")
        check(self.attention_heads >= 0, "attention_heads", "must be >= 0")


@dataclass
class ProbeOptimConfig:
    lrs: list[float] = field(default_factory=lambda: list(PAPER_LRS))  # peak lrs: a head per lr x weight decay x kind
    weight_decays: list[float] = field(default_factory=lambda: list(PAPER_WDS))  # AdamW weight decays of the grid
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's [beta1, beta2]
    min_lr: float = 1e-5  # cosine floor (a head whose lr is lower stays at its lr)
    epochs: int = 100  # passes of head training over the train split
    warmup_epochs: int = 5  # epochs of linear warmup to each head's lr, then cosine to min_lr
    grad_clip: float = 3.0  # per head gradient-norm clip; 0 disables

    def validate(self) -> None:
        check(len(self.lrs) > 0 and all(lr > 0 for lr in self.lrs), "lrs", "must be a non-empty list of values > 0")
        check(
            len(self.weight_decays) > 0 and all(wd >= 0 for wd in self.weight_decays),
            "weight_decays",
            "must be a non-empty list of values >= 0",
        )
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        check(self.min_lr >= 0, "min_lr", "must be >= 0")
        check(self.epochs > 0, "epochs", "must be > 0")
        check(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "must be within [0, optim.epochs)")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)")


@dataclass
class ProbeConfig:
    checkpoint: str = "???"  # an `aimv2 pretrain` checkpoint (Lightning .ckpt)
    run_dir: str = ""  # "" = <checkpoint's run dir>/probe
    mode: str = "cached"  # cached: features once, heads train many epochs fast; augmented: the paper's protocol
    img_size: int = 0  # 0 = the encoder's training resolution
    # [min, max] patches: probe at native resolution (each image at its own aspect ratio, its grid within
    # the range; a native encoder, model.native, is needed; cached mode). [] = square img_size images.
    native_patches: list[int] = field(default_factory=list)
    cache_dtype: str = "float32"  # dtype of cached features; float16 halves the file (docs/probing.md)
    accelerator: str = "auto"  # auto | cpu | cuda
    devices: int = (
        1  # processes (torch.distributed; gloo on CPU, nccl on CUDA): extraction in cached mode, training in augmented
    )
    seed: int = 0  # head initialization, example order, augmentations, the select_fraction hold-out
    progress_bar: bool = True  # progress of extraction and head training (docs/monitoring.md); false: none
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)  # the train, val and selection splits
    head: ProbeHeadConfig = field(default_factory=ProbeHeadConfig)  # head kinds, feature blocks, pooling heads
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)  # the grid of lrs x weight decays, schedule

    def validate(self) -> None:
        check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        check(self.cache_dtype in CACHE_DTYPES, "cache_dtype", f"must be one of {', '.join(CACHE_DTYPES)}")
        check(self.accelerator in ("auto", "cpu", "cuda"), "accelerator", "must be auto, cpu or cuda")
        check(self.devices >= 1, "devices", "must be >= 1")
        check(self.img_size >= 0, "img_size", "must be >= 0 (0 = the encoder's)")
        if self.native_patches:
            check(
                len(self.native_patches) == 2 and 2 <= self.native_patches[0] <= self.native_patches[1],
                "native_patches",
                f"must be [min, max] with 2 <= min <= max, got {self.native_patches}",
            )
            check(self.mode == "cached", "native_patches", "native-resolution probing runs in cached mode only")
        check(
            self.mode == "cached" or not (self.data.select or self.data.select_fraction),
            "data.select",
            "a selection split (data.select, data.select_fraction) needs cached mode; augmented mode chooses on val",
        )

    def resolved_run_dir(self) -> Path:
        """run_dir, or RUN/probe for a checkpoint in RUN/checkpoints/ (aimv2.engine.run_dir), else runs/probe."""
        if self.run_dir:
            return Path(self.run_dir)
        run = RunDir.of_checkpoint(self.checkpoint)
        return run.probe if run is not None else Path("runs/probe")
