"""The `aimv2 compress` schema, loaded with `aimv2.config.load_config(path, overrides, schema=CompressConfig)`.

The sequence the LLM sees is `[text.prefix] [M visual tokens] [text.prompt] [caption]`: image
tokens come before the text; only caption tokens are predicted (prefix, visual and prompt
positions carry label -100). `text.prefix` does not depend on the image, so its KV cache is
computed once and shared by every image (see aimv2/compress/cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aimv2.compress.registry import COMPRESSORS
from aimv2.config import TokenizerConfig, TrainerConfig
from aimv2.errors import UserError

LM_ARCHS = ("llama", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EncoderSection:
    source: str = ""  # required to train: what aimv2's encoder loader takes: an `aimv2 pretrain` checkpoint (e.g. RUN/checkpoints/last.ckpt)
    img_size: int = 0  # 0 = the encoder's own resolution


@dataclass
class CompressorSection:
    kind: str = "pool"  # mlp | pool | resampler | tokenpacker | quecc | kdv
    num_tokens: int = 16  # M visual tokens; 0 = all N (mlp keeps all N)
    hidden: int = 0  # MLP hidden width (default: LLM width) / attention width (default: encoder width)
    heads: int = 4  # attention heads (resampler, tokenpacker, quecc)
    layers: int = 2  # cross-attention blocks (resampler)
    train_tokens: list[int] = field(default_factory=list)  # pool/kdv: draw M per step from this list (Matryoshka-style)
    init: str = ""  # start from the compressor of this checkpoint / run dir / bundle (e.g. stage 1 before stage 2)


@dataclass
class LMSection:
    path: str = ""  # a local Hugging Face model directory (AutoModelForCausalLM, local_files_only); "" = random init below
    arch: str = "llama"  # random init: llama | qwen2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 512
    init_std: float = 0.02  # random init: weight std (HF's default 0.02 leaves a frozen tiny LM's outputs near uniform)
    seed: int = 0  # seeds the random init (the weights are also stored in checkpoints and bundles)
    dtype: str = "float32"  # float32 on CPUs; bfloat16 on GPUs


@dataclass
class TextSection:
    prefix: str = ""  # text before the image tokens (system prompt, or the question in query-first use); KV-cached
    prompt: str = ""  # text after the image tokens, before the caption (e.g. "Caption:"); not predicted
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # kind clip|hf; vocab must match the LM


@dataclass
class CompressDataSection:
    train: str = ""  # required to train: image-caption shards (brace pattern, '::' joins several), e.g. /data/cc/{00000..00099}.tar
    val: str = ""  # held-out image-caption shards for `aimv2 compress evaluate`
    batch_size: int = 16  # per device
    num_workers: int = 2
    shuffle_buffer: int = 500
    seed: int = 0


@dataclass
class CompressOptimSection:
    lr: float = 1e-3  # LLaVA stage 1: 1e-3 for the projector
    min_lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # fully decoupled, as in pre-training: weights shrink by this x lr_t / lr per step
    warmup_steps: int = 30
    grad_clip: float = 1.0  # 0 disables
    lm_lr_scale: float = 0.125  # stage 2: the LLM's lr = lr * this (AIMv2's VLM: connector lr 8x the LLM's)


@dataclass
class CompressConfig:
    run_dir: str = "runs/compress"
    stage: int = 1  # 1: only the compressor trains (LLaVA alignment); 2: compressor + LLM
    encoder: EncoderSection = field(default_factory=EncoderSection)
    compressor: CompressorSection = field(default_factory=CompressorSection)
    lm: LMSection = field(default_factory=LMSection)
    text: TextSection = field(default_factory=TextSection)
    data: CompressDataSection = field(default_factory=CompressDataSection)
    optim: CompressOptimSection = field(default_factory=CompressOptimSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        """Called by load_config: bad values are one-line errors naming the key."""
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise UserError(f"config key '{key}': {msg}")

        check(self.stage in (1, 2), "stage", f"must be 1 (compressor only) or 2 (compressor + LLM), got {self.stage}")
        check(self.encoder.img_size >= 0, "encoder.img_size", "must be >= 0 (0 = the encoder's)")
        c = self.compressor
        check(c.kind in COMPRESSORS, "compressor.kind", f"unknown compressor {c.kind!r} (one of {', '.join(COMPRESSORS)})")
        check(c.num_tokens >= 0, "compressor.num_tokens", "must be >= 0 (0 = all patches)")
        check(c.hidden >= 0 and c.heads >= 1 and c.layers >= 1, "compressor", "hidden >= 0, heads >= 1, layers >= 1")
        check(not c.train_tokens or c.kind in ("pool", "kdv"), "compressor.train_tokens",
              f"only pool and kdv can change M during training, not {c.kind}")
        check(all(m >= 1 for m in c.train_tokens), "compressor.train_tokens", "values must be >= 1")
        m = self.lm
        check(m.arch in LM_ARCHS, "lm.arch", f"must be one of {', '.join(LM_ARCHS)}, got {m.arch!r}")
        check(m.dtype in DTYPES, "lm.dtype", f"must be one of {', '.join(DTYPES)}, got {m.dtype!r}")
        check(min(m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size, m.max_positions) >= 1, "lm",
              "sizes must be >= 1")
        check(0 < m.init_std <= 1, "lm.init_std", f"must be within (0, 1], got {m.init_std}")
        check(m.hidden_size % m.num_heads == 0, "lm.num_heads", f"must divide lm.hidden_size={m.hidden_size}")
        t = self.text.tokenizer
        check(t.kind in ("clip", "hf"), "text.tokenizer.kind", f"must be 'clip' or 'hf', got {t.kind!r}")
        check(t.max_length >= 2, "text.tokenizer.max_length", "must be >= 2")
        d = self.data
        check(d.batch_size > 0, "data.batch_size", "must be > 0")
        check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
        o = self.optim
        check(len(o.betas) == 2, "optim.betas", "must be two numbers")
        check(o.lr >= 0, "optim.lr", f"must be >= 0 (0: nothing trains), got {o.lr:g}")
        check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be within [0, optim.lr={o.lr:g}], got {o.min_lr:g}")
        check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay:g}")
        check(o.lm_lr_scale > 0, "optim.lm_lr_scale", "must be > 0")
        check(self.trainer.checkpoint_every_n_steps > 0, "trainer.checkpoint_every_n_steps", "must be > 0")

    def require(self, *keys: str) -> None:
        """A UserError naming the first of these dotted keys that is empty (what a verb needs set)."""
        for key in keys:
            value = self
            for part in key.split("."):
                value = getattr(value, part)
            if not value:
                raise UserError(f"config key '{key}': required (set it in the config file or as {key}=...)")


def config_to_dict(cfg: CompressConfig) -> dict:
    """Plain dict (checkpoint hyper-parameters and bundles load with weights_only=True)."""
    from dataclasses import asdict

    return asdict(cfg)


def config_from_dict(values: dict) -> CompressConfig:
    """The dataclass back from `config_to_dict` output (keys added since are filled with defaults)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CompressConfig), values))
