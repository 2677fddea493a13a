"""The components a VLM is assembled from: the frozen encoder (loaded from any checkpoint, patches out of
a chosen layer), the language model, and the compressor registry.

The frozen vision encoder of an attachment: loading it (through `aimv2.load_encoder`), its patch
grid and width, and its last attention keys (for key-diversity pruning).

The frozen language model: any Hugging Face causal LM from a local directory, or a small
randomly initialized Llama/Qwen2 for tests and the offline demo (these machines reach no hub).

Also the parameter count the prefill formula uses: 2 * N_params * (Q + V) FLOPs per sequence,
where N_params leaves out the input embedding table (a lookup, not a matmul).

The compressor registry: a `compressor.kind` name -> its class; one call builds any of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aimv2.compress.base import Compressor, CompressorSpec
from aimv2.compress.cross_attention import QueCC, Resampler, TokenPacker
from aimv2.compress.projectors import KDVPruner, MLPProjector, PooledProjector
from aimv2.errors import UserError


def load_frozen_encoder(source: str, img_size: int = 0):
    """(encoder in eval mode with requires_grad off, Preprocessing) from any source
    `aimv2.load_encoder` reads (a pretrain .ckpt, a ZeRO directory, timm/transformers/aimv2 exports,
    Apple's release); img_size=0 keeps the encoder's own resolution."""
    from aimv2 import load_encoder

    encoder, preprocessing = load_encoder(source, img_size=img_size or None)
    return freeze(encoder), preprocessing


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def patch_grid(encoder: nn.Module) -> tuple[int, int]:
    """(gh, gw) of a timm ViT's patch embedding at its current input size."""
    try:
        gh, gw = encoder.patch_embed.grid_size
    except AttributeError:
        raise UserError(
            f"encoder.source: {type(encoder).__name__} has no patch_embed.grid_size (a timm ViT is expected)"
        ) from None
    return int(gh), int(gw)


def encoder_width(encoder: nn.Module) -> int:
    return int(getattr(encoder, "embed_dim", None) or encoder.num_features)


class LastKeys:
    """Captures the keys (B, N, D) of the encoder's last attention layer during a forward pass, for
    key-diversity pruning: a forward hook on the fused qkv projection of timm's Attention."""

    def __init__(self, encoder: nn.Module):
        attn = encoder.blocks[-1].attn
        if not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise UserError("compressor.kind=kdv needs a timm ViT whose last block has a fused qkv projection")
        self.attn, self.prefix = attn, int(getattr(encoder, "num_prefix_tokens", 0))
        self.keys: torch.Tensor | None = None
        self.handle = attn.qkv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output: torch.Tensor) -> None:
        b, t, three_d = output.shape
        d = three_d // 3
        heads = self.attn.num_heads
        k = output[..., d : 2 * d].reshape(b, t, heads, d // heads)
        k = self.attn.k_norm(k)  # identity for AIMv2; QK-norm models normalize keys per head
        self.keys = k.reshape(b, t, d)[:, self.prefix :]  # patches only (AIMv2 has no prefix tokens)

    def pop(self) -> torch.Tensor:
        keys, self.keys = self.keys, None
        if keys is None:
            raise RuntimeError("no keys captured: run the encoder first")
        return keys


def encode_patches(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch features (B, N, D) after the final norm. Prefix tokens (class/register), which AIMv2
    does not have, are dropped by count, never by assuming token 0 is one."""
    features = encoder.forward_features(images)
    return features[:, int(getattr(encoder, "num_prefix_tokens", 0)) :]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("aimv2 compress needs transformers: pip install 'aimv2[hf]'") from None
    return transformers


def _dtype_kwarg(tf, dtype: torch.dtype) -> dict:
    """transformers >= 4.56 names it `dtype`; older releases `torch_dtype`."""
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def random_lm_config(cfg, vocab_size: int):
    """A LlamaConfig / Qwen2Config from the `lm` section; vocab from the tokenizer."""
    tf = _transformers()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,
        initializer_range=cfg.init_std,
    )
    return tf.LlamaConfig(**common) if cfg.arch == "llama" else tf.Qwen2Config(**common)


def build_lm(cfg, vocab_size: int) -> nn.Module:
    """The causal LM of the `lm` section, in eval mode. A local path wins over random init."""
    tf = _transformers()
    dtype = _DTYPES[cfg.dtype]
    if cfg.path:
        if not Path(cfg.path).is_dir():
            raise UserError(f"config key 'lm.path': model directory not found: {cfg.path}")
        try:
            lm = tf.AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, **_dtype_kwarg(tf, dtype))
        except Exception as err:  # noqa: BLE001 - any loading failure is a bad directory for the user
            raise UserError(
                f"config key 'lm.path': cannot load a causal LM from {cfg.path}: {str(err).splitlines()[0][:200]}"
            ) from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            lm = tf.AutoModelForCausalLM.from_config(random_lm_config(cfg, vocab_size), **_dtype_kwarg(tf, dtype))
    check_vocab(lm, vocab_size)
    return lm.eval()


def check_vocab(lm: nn.Module, vocab_size: int) -> None:
    """Every tokenizer id must index the LM's embedding table."""
    rows = lm.get_input_embeddings().num_embeddings
    if vocab_size > rows:
        raise UserError(
            f"config key 'text.tokenizer': the tokenizer has {vocab_size} tokens but the LM's embedding "
            f"table has {rows} rows: use the LM's own tokenizer (text.tokenizer.kind=hf, path=<lm dir>)"
        )


def prefill_params(lm: nn.Module) -> int:
    """N_params of the prefill formula: all LM parameters except the input embedding table."""
    total = sum(p.numel() for p in lm.parameters())
    return total - lm.get_input_embeddings().weight.numel()


def prefill_flops(n_params: float, text_tokens: int, visual_tokens: int) -> float:
    """2 * N_params * (Q + V): the dense-matmul cost of prefilling Q text and V visual tokens
    (attention's quadratic term is left out, as in the paper; it is small at these lengths)."""
    return 2.0 * n_params * (text_tokens + visual_tokens)


def with_cache(lm: nn.Module, cache) -> dict:
    """forward kwargs passing a KV cache under the name this LM's forward takes: `cache` in
    transformers 5.x (which deprecates `past_key_values`, to be removed in 5.40), `past_key_values` in
    earlier releases (the `hf` extra admits 4.54 and later)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values": cache}


def returned_cache(out):
    """The KV cache an LM forward returned (`out.cache` in transformers 5.x, where reading
    `out.past_key_values` warns; `out.past_key_values` before)."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


def keep_last_logits(lm: nn.Module, n: int) -> dict:
    """forward kwargs computing logits for the last n positions only, where the LM supports it
    (the vocabulary projection of every position is most of a small LM's cost and memory)."""
    import inspect

    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}


COMPRESSORS: dict[str, type[Compressor]] = {
    "mlp": MLPProjector,  # LLaVA-1.5, M = N
    "pool": PooledProjector,  # Matryoshka / LDPv2: avg-pool to sqrt(M) x sqrt(M) + MLP
    "resampler": Resampler,  # Flamingo's Perceiver Resampler: M learned latents attend over [patches; latents]
    "tokenpacker": TokenPacker,  # pooled grid queries attend to their own region (+ residual)
    # text-conditioned depthwise-conv queries attend to their own region (k/v without text, no residual)
    "quecc": QueCC,
    "kdv": KDVPruner,  # training-free key-diversity pruning to M, then the MLP
}


def compressor_class(kind: str) -> type[Compressor]:
    try:
        return COMPRESSORS[kind]
    except KeyError:
        raise UserError(
            f"config key 'compressor.kind': unknown compressor {kind!r} (one of {', '.join(COMPRESSORS)})"
        ) from None


def build_compressor(spec: CompressorSpec) -> Compressor:
    """A fresh compressor; M = 0 in the spec means all N patches (what `mlp` keeps)."""
    if spec.num_tokens == 0:
        spec = CompressorSpec(**(spec.to_dict() | {"grid": spec.grid, "num_tokens": spec.num_patches}))
    return compressor_class(spec.kind)(spec)
