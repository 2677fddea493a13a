"""Build an attachment from the sections of a compress config it needs (stage, encoder, compressor,
lm, text): frozen encoder, tokenizer, LM, compressor, text ids."""

from __future__ import annotations

from aimv2.compress.base import CompressorSpec
from aimv2.compress.config import CompressorSection, EncoderSection, LMSection, TextSection
from aimv2.compress.encoder import encoder_width, freeze, load_frozen_encoder, patch_grid
from aimv2.compress.lm import build_lm
from aimv2.compress.registry import build_compressor
from aimv2.compress.vlm import AttachedVLM
from aimv2.data.tokenizer import CaptionTokenizer, build_tokenizer
from aimv2.errors import UserError


def text_ids(tokenizer: CaptionTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text) if text else []


def bos_ids(tokenizer: CaptionTokenizer) -> list[int]:
    """[begin-of-sequence] when the tokenizer has one: pretrained LMs expect it first, and it gives
    the first caption token a position to be predicted from even with no image or prompt before it.
    CLIP's BPE: <start_of_text>; Hugging Face tokenizers: bos_token_id (Qwen2's has none)."""
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def build_text_tokenizer(text: TextSection) -> CaptionTokenizer:
    if text.tokenizer.kind == "hf" and not text.tokenizer.path:
        raise UserError("config key 'text.tokenizer.path': required (set it in the config file or as "
                        "text.tokenizer.path=...)")
    return build_tokenizer(text.tokenizer)


def compressor_spec(compressor: CompressorSection, d_vis: int, d_llm: int, grid: tuple[int, int]) -> CompressorSpec:
    c = compressor
    return CompressorSpec(kind=c.kind, d_vis=d_vis, d_llm=d_llm, grid=grid, num_tokens=c.num_tokens or grid[0] * grid[1],
                          hidden=c.hidden, heads=c.heads, layers=c.layers)


def build_attachment(stage: int, encoder: EncoderSection, compressor: CompressorSection, lm: LMSection,
                     text: TextSection, frozen_encoder=None, preprocessing=None) -> tuple[AttachedVLM, CaptionTokenizer]:
    """The attachment of these sections: the LM trains in stage 2 only. `frozen_encoder`/`preprocessing`
    skip loading `encoder.source` (tests)."""
    tokenizer = build_text_tokenizer(text)
    if frozen_encoder is None:
        frozen_encoder, preprocessing = load_frozen_encoder(encoder.source, encoder.img_size)
    else:
        freeze(frozen_encoder)
    language_model = build_lm(lm, tokenizer.vocab_size)
    for p in language_model.parameters():
        p.requires_grad_(stage == 2)
    d_llm = language_model.get_input_embeddings().embedding_dim
    spec = compressor_spec(compressor, encoder_width(frozen_encoder), d_llm, patch_grid(frozen_encoder))
    prefix = bos_ids(tokenizer) + text_ids(tokenizer, text.prefix)
    vlm = AttachedVLM(frozen_encoder, build_compressor(spec), language_model, prefix, text_ids(tokenizer, text.prompt),
                      preprocessing)
    return vlm, tokenizer
