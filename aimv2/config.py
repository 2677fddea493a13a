"""The configuration schema: typed dataclasses; values come from YAML files and `key=value` overrides.

Each component receives only its own section (`ModelConfig`, `DataConfig`, ...), never the whole
tree. Unknown keys, wrong types and missing files are `UserError`s that name the key or the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aimv2.errors import UserError


@dataclass
class ModelConfig:
    size: str = "debug"  # a row of aimv2.models.sizes.SIZES
    img_size: int = 224  # a multiple of the patch size (14)
    init_from: Optional[str] = None  # start from this checkpoint's weights, not a resume (aimv2.pretraining.init_from)


@dataclass
class SourceConfig:
    urls: str = "???"  # brace-expanded shard list, e.g. /data/cc/{00000..00127}.tar ('::' joins lists)
    weight: float = 1.0  # sampling weight in resampled mode
    name: str = ""


@dataclass
class TokenizerConfig:
    kind: str = "clip"  # "clip": open_clip's BPE shipped in its wheel (offline); "hf": a local directory; "words": a word list
    path: Optional[str] = None  # kind=hf: directory holding tokenizer.json / tokenizer_config.json; kind=words: the list
    max_length: int = 77  # tokens per caption, end-of-text included


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    mode: str = "resampled"  # "resampled": infinite, shards drawn with replacement; "epoch": each sample once per epoch
    batch_size: int = 8  # per device
    num_workers: int = 2
    shuffle_buffer: int = 1000  # samples; 0 disables
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    seed: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class ObjectiveConfig:
    alpha: float = 0.4  # weight of the image loss; 0 = captioning-only baseline
    text_weight: float = 1.0  # weight of the text loss; 0 = image-only (AIMv1-like)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak; 0 is allowed (with min_lr 0): nothing moves, neither update nor decay
    min_lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # The paper's lambda, fully decoupled (ml-l3m's AdamLH): every step a decayed weight is multiplied
    # by 1 - weight_decay * lr_t / lr, i.e. torch AdamW with weight_decay / lr (aimv2.engine.optim).
    # Not applied to norms, biases, position embeddings, start token.
    weight_decay: float = 1e-4
    warmup_steps: int = 12_500
    grad_clip: float = 1.0  # 0 disables


STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed; presets in configs/strategy/ (aimv2.engine.strategy)
    zero_stage: int = 2  # deepspeed: ZeRO stage 2 (optimizer + gradients sharded) or 3 (+ parameters)
    offload: bool = False  # deepspeed: optimizer states (stage 3: and parameters) in CPU memory; fsdp: parameters
    activation_checkpointing: bool = False  # recompute every transformer block in backward (encoder and decoder)
    accumulate_grad_batches: int = 1  # batches per optimizer step
    compile: bool = False  # torch.compile every transformer block
    precision: str = "32-true"  # bf16-mixed on GPUs; keep fp32 on CPUs
    max_steps: int = -1
    max_epochs: Optional[int] = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 1000
    keep_checkpoints: int = 3  # newest step=N checkpoints kept (plus last.ckpt); -1 keeps all
    max_nonfinite_steps: int = 10  # steps in a row with a NaN/inf loss or gradient (each skipped) before stopping
    seed: int = 0
    resume: Optional[str] = None  # checkpoint path, "auto" (newest intact in run_dir), "none"; unset: auto under SLURM
    overwrite: bool = False  # start afresh in a run_dir that holds another run, deleting its checkpoints and logs
    log_samples: bool = False  # write the keys of every consumed sample to RUN/logs/samples/rank*.tsv
    progress_bar: bool = True


@dataclass
class VisualizeConfig:
    every_n_steps: int = 1000  # a prediction grid every N optimizer steps (plus step 0 and the last); 0 disables
    num_images: int = 4  # samples of the fixed batch (the first training batch) shown
    prefix_ratio: float = 0.5  # prefix length M = round(ratio * patches), within [1, N-1]
    max_caption_tokens: int = 20  # greedy caption length limit; 0: no captions
    images: list[str] = field(default_factory=list)  # image files/dirs to show instead of the first batch


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    return f"config key '{key}': {msg}" if key else msg


def load_config(path: str | Path | list | None, overrides: list[str] = (), schema: type = PretrainConfig):
    """Schema defaults <- YAML file(s), later ones win (e.g. a strategy preset) <- `key=value` overrides,
    validated, as a dataclass instance."""
    layers = [OmegaConf.structured(schema)]
    for item in ([] if path is None else path if isinstance(path, (list, tuple)) else [path]):
        path = Path(item)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # YAML syntax
            raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        try:
            layers.append(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise UserError(_one_line(err)) from None
        except Exception as err:  # YAML syntax of the value, e.g. an unquoted {00..09} inside [{...}]
            raise UserError(f"override {item!r}: value is not valid YAML ({str(err).splitlines()[0]}); "
                            "quote shard patterns: urls: \"/d/{00000..00009}.tar\"") from None
    try:
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(_one_line(err)) from None
    if hasattr(cfg, "validate"):  # a schema may carry its own checks
        cfg.validate()
    elif schema in _VALIDATORS:
        _VALIDATORS[schema](cfg)
    return cfg


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) so a run directory says how it was made."""
    from aimv2.fileio import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}': {msg}")


def validate_pretrain(cfg: PretrainConfig) -> None:
    from aimv2.models.sizes import get_size

    spec = get_size(cfg.model.size)
    _check(cfg.model.img_size % spec.patch_size == 0, "model.img_size",
           f"{cfg.model.img_size} is not a multiple of the patch size {spec.patch_size}")
    d = cfg.data
    _check(len(d.sources) > 0, "data.sources", "no shard sources given (list of {urls, weight})")
    for i, src in enumerate(d.sources):
        _check(src.weight > 0, f"data.sources.{i}.weight", f"must be > 0, got {src.weight}")
    _check(d.mode in ("resampled", "epoch"), "data.mode", f"must be 'resampled' or 'epoch', got {d.mode!r}")
    _check(d.batch_size > 0, "data.batch_size", "must be > 0")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.tokenizer.kind in ("clip", "hf", "words"), "data.tokenizer.kind",
           f"must be 'clip', 'hf' or 'words', got {d.tokenizer.kind!r}")
    _check(d.tokenizer.kind == "clip" or bool(d.tokenizer.path), "data.tokenizer.path", f"required for kind={d.tokenizer.kind}")
    _check(d.tokenizer.max_length >= 2, "data.tokenizer.max_length", "must be >= 2")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
           f"must be [min, max] within (0, 1], got {d.crop_scale}")
    _check(cfg.objective.alpha >= 0 and cfg.objective.text_weight >= 0, "objective",
           "alpha and text_weight must be >= 0")
    _check(cfg.objective.alpha + cfg.objective.text_weight > 0, "objective", "alpha and text_weight are both 0")
    _check(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers")
    o = cfg.optim
    _check(o.lr >= 0, "optim.lr", f"must be >= 0 (0: nothing trains), got {o.lr:g}")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be within [0, optim.lr={o.lr:g}], got {o.min_lr:g}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay:g}")
    t = cfg.trainer
    if d.mode == "resampled":
        _check(t.max_steps > 0, "trainer.max_steps", "must be > 0 in resampled (infinite) data mode")
    else:
        _check(t.max_steps > 0 or (t.max_epochs or 0) > 0, "trainer.max_epochs",
               "set trainer.max_epochs or trainer.max_steps in epoch data mode")
    _check(t.checkpoint_every_n_steps > 0, "trainer.checkpoint_every_n_steps", "must be > 0")
    validate_trainer(t)


def validate_trainer(t: TrainerConfig) -> None:
    _check(t.strategy in STRATEGIES, "trainer.strategy", f"must be one of {', '.join(STRATEGIES)}, got {t.strategy!r}")
    _check(t.strategy not in ("fsdp", "deepspeed") or t.accelerator != "cpu", "trainer.strategy",
           f"{t.strategy} needs GPUs (Lightning refuses it on the CPU accelerator): set trainer.accelerator=gpu")
    _check(t.zero_stage in (2, 3), "trainer.zero_stage", f"must be 2 or 3, got {t.zero_stage}")
    _check(not t.offload or t.strategy in ("deepspeed", "fsdp"), "trainer.offload",
           f"needs trainer.strategy=deepspeed or fsdp, got {t.strategy!r}")
    _check(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", "must be >= 1")
    _check(t.keep_checkpoints == -1 or t.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1, or -1 (all)")
    _check(t.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps", "must be >= 1")


_VALIDATORS = {PretrainConfig: validate_pretrain}
