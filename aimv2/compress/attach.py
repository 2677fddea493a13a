"""Build an attachment from a `CompressConfig`: frozen encoder, tokenizer, LM, compressor, text ids."""

from __future__ import annotations

from aimv2.compress.base import CompressorSpec
from aimv2.compress.config import CompressConfig
from aimv2.compress.encoder import encoder_width, freeze, load_frozen_encoder, patch_grid
from aimv2.compress.lm import build_lm
from aimv2.compress.registry import build_compressor
from aimv2.compress.vlm import AttachedVLM
from aimv2.data.tokenizer import CaptionTokenizer, build_tokenizer


def text_ids(tokenizer: CaptionTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text) if text else []


def bos_ids(tokenizer: CaptionTokenizer) -> list[int]:
    """[begin-of-sequence] when the tokenizer has one: pretrained LMs expect it first, and it gives
    the first caption token a position to be predicted from even with no image or prompt before it.
    CLIP's BPE: <start_of_text>; Hugging Face tokenizers: bos_token_id (Qwen2's has none)."""
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def build_text_tokenizer(cfg: CompressConfig) -> CaptionTokenizer:
    if cfg.text.tokenizer.kind == "hf":
        cfg.require("text.tokenizer.path")
    return build_tokenizer(cfg.text.tokenizer)


def compressor_spec(cfg: CompressConfig, d_vis: int, d_llm: int, grid: tuple[int, int]) -> CompressorSpec:
    c = cfg.compressor
    return CompressorSpec(kind=c.kind, d_vis=d_vis, d_llm=d_llm, grid=grid, num_tokens=c.num_tokens or grid[0] * grid[1],
                          hidden=c.hidden, heads=c.heads, layers=c.layers)


def build_attachment(cfg: CompressConfig, encoder=None, preprocessing=None) -> tuple[AttachedVLM, CaptionTokenizer]:
    """The attachment of a config. `encoder`/`preprocessing` skip loading `encoder.source` (tests)."""
    tokenizer = build_text_tokenizer(cfg)
    if encoder is None:
        encoder, preprocessing = load_frozen_encoder(cfg.encoder.source, cfg.encoder.img_size)
    else:
        freeze(encoder)
    lm = build_lm(cfg.lm, tokenizer.vocab_size)
    for p in lm.parameters():
        p.requires_grad_(cfg.stage == 2)
    d_llm = lm.get_input_embeddings().embedding_dim
    spec = compressor_spec(cfg, encoder_width(encoder), d_llm, patch_grid(encoder))
    compressor = build_compressor(spec)
    prefix = bos_ids(tokenizer) + text_ids(tokenizer, cfg.text.prefix)
    vlm = AttachedVLM(encoder, compressor, lm, prefix, text_ids(tokenizer, cfg.text.prompt), preprocessing)
    return vlm, tokenizer
