"""The attachment: frozen encoder -> compressor -> causal LM, with exact visual-token bookkeeping.

The LLM sees `inputs_embeds` laid out as

    [prefix P0] [visual M] [prompt P] [caption L]      (S = P0 + M + P + L positions)

and only caption tokens are predicted: labels are -100 on the prefix, visual and prompt positions
and on caption padding (the Hugging Face convention: labels[t] is the token at position t; the
model's output at t-1 predicts it). Captions are right-padded; padding is masked out of attention.

Text-prefix KV caching: the keys and values of a fixed text are computed once and reused for
every image.

Which text can be shared follows from causal attention: a position's keys and values depend on
every position before it. With the image tokens first (`[image][prompt][caption]`), the prompt's
KV depends on the image, so nothing after the image can be reused across images. What is shared
is text placed *before* the image: `text.prefix` (a system prompt, or the question itself in a
query-first layout `[question][image]`, which is what the "one visual token" regime assumes when it
counts cached text as free). Its KV is computed once (`build_prefix`), expanded to the batch
without copying (`TextPrefix.for_batch`), and the LLM then prefills only `[image][prompt]...`:
the prefill cost drops from 2*N*(P+V+Q) to 2*N*(V+Q) FLOPs for a prefix of P tokens.

Caches are `transformers` DynamicCache objects (Llama, Qwen2, Mistral, ... causal LMs).

Build an attachment from the sections of a compress config it needs (stage, encoder, compressor,
lm, text): frozen encoder, tokenizer, LM, compressor, text ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aimv2.compress.base import Compressor, CompressorSpec
from aimv2.compress.components import (
    LastKeys,
    build_compressor,
    build_lm,
    encode_patches,
    encoder_width,
    freeze,
    keep_last_logits,
    load_frozen_encoder,
    patch_grid,
    returned_cache,
    with_cache,
)
from aimv2.compress.config import CompressorSection, EncoderSection, LMSection, TextSection
from aimv2.data.tokenizer import CaptionTokenizer, build_tokenizer
from aimv2.errors import UserError
from aimv2.models.encoder import grid_of

IGNORE = -100


def caption_labels(n_before: int, captions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels (B, n_before + L): -100 on the n_before non-caption positions and on padding."""
    before = torch.full((captions.shape[0], n_before), IGNORE, dtype=torch.long, device=captions.device)
    return torch.cat([before, captions.masked_fill(~mask, IGNORE)], dim=1)


class AttachedVLM(nn.Module):
    """encoder (frozen) + compressor + LM. `lm` may be None for a front end that only makes visual tokens."""

    def __init__(
        self,
        encoder: nn.Module,
        compressor: Compressor,
        lm: nn.Module | None,
        prefix_ids: list[int] = (),
        prompt_ids: list[int] = (),
        preprocessing=None,
    ):
        super().__init__()
        self.encoder, self.compressor, self.lm = encoder, compressor, lm
        self.register_buffer("prefix_ids", torch.tensor(list(prefix_ids), dtype=torch.long), persistent=False)
        self.register_buffer("prompt_ids", torch.tensor(list(prompt_ids), dtype=torch.long), persistent=False)
        self.preprocessing = preprocessing  # resize/crop/normalization the encoder expects
        self._keys = LastKeys(encoder) if compressor.uses_keys else None
        if compressor.uses_text and self.prefix_ids.numel() + self.prompt_ids.numel() == 0:
            # No instruction text (and no BOS) ever conditions it: the text path would get no gradient,
            # which DDP refuses (unused parameters); it stays frozen.
            for p in compressor.text_parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> AttachedVLM:
        """The encoder always runs in eval mode; so does the LM while it is frozen (stage 1)."""
        super().train(mode)
        self.encoder.eval()
        if self.lm is not None and not any(p.requires_grad for p in self.lm.parameters()):
            self.lm.eval()
        return self

    # -- visual tokens -------------------------------------------------------------------------
    def text_condition(
        self, text_ids: torch.Tensor | None = None, prefix: TextPrefix | None = None
    ) -> torch.Tensor | None:
        """(1, D_llm): the LM's last hidden state at the last token of the instruction text
        (prefix + prompt by default), for text-conditioned compressors; None for the others."""
        if not self.compressor.uses_text:
            return None
        if text_ids is None:
            if prefix is not None and self.prompt_ids.numel() == 0:
                return prefix.last_hidden  # the cached prefix run already computed it
            text_ids = torch.cat([self.prefix_ids, self.prompt_ids])
        if text_ids.numel() == 0:
            return None  # no text: the compressor runs unconditioned
        if self.lm is None:
            raise ValueError("a text-conditioned compressor needs the LM for its text embedding (or pass text=)")
        out = self.lm(
            input_ids=text_ids.reshape(1, -1),
            output_hidden_states=True,
            use_cache=False,
            **keep_last_logits(self.lm, 1),
        )
        return out.hidden_states[-1][:, -1]

    def visual_tokens(
        self, images: torch.Tensor, text: torch.Tensor | None = None, prefix: TextPrefix | None = None
    ) -> torch.Tensor:
        """images (B, 3, H, W) -> (B, M, D_llm). `text` (B or 1, D_llm) overrides the instruction text."""
        with torch.no_grad():
            features = encode_patches(self.encoder, images)  # (B, N, D_vis)
            keys = self._keys.pop() if self._keys is not None else None
        cond = text if text is not None else self.text_condition(prefix=prefix)
        if cond is not None:
            cond = cond.to(features.dtype)
        grid = grid_of(self.encoder, images)  # any size a native encoder takes
        tokens = self.compressor(features, text=cond, keys=keys, grid=grid)  # (B, M, D_llm)
        return tokens.to(self.lm.dtype) if self.lm is not None else tokens

    # -- sequences -----------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def sequence(
        self,
        visual: torch.Tensor | None,
        batch: int,
        captions: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        with_prefix: bool = True,
    ):
        """-> inputs_embeds (B, S, D), attention_mask (B, S), n_before (positions before the caption).
        visual=None leaves the image out (the text-only baseline)."""
        parts = []
        if with_prefix and self.prefix_ids.numel():
            parts.append(self._embed(self.prefix_ids).unsqueeze(0).expand(batch, -1, -1))
        if visual is not None:
            parts.append(visual)
        if self.prompt_ids.numel():
            parts.append(self._embed(self.prompt_ids).unsqueeze(0).expand(batch, -1, -1))
        n_before = sum(p.shape[1] for p in parts)
        mask = [torch.ones(batch, n_before, dtype=torch.long, device=self.prompt_ids.device)]
        if captions is not None:
            parts.append(self._embed(captions))
            mask.append(caption_mask.long())
        return torch.cat(parts, dim=1), torch.cat(mask, dim=1), n_before

    def _run(
        self, embeds: torch.Tensor, mask: torch.Tensor, prefix: TextPrefix | None, keep: int, use_cache: bool = False
    ):
        """One LM forward -> (output, attention mask incl. the prefix). With a prefix, its cache
        stands in for the prefix positions (a cache is then always returned)."""
        cache = None
        if prefix is not None:
            b = embeds.shape[0]
            cache, use_cache = prefix.for_batch(b), True
            mask = torch.cat([torch.ones(b, prefix.length, dtype=mask.dtype, device=mask.device), mask], dim=1)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            use_cache=use_cache,
            **with_cache(self.lm, cache),
            **keep_last_logits(self.lm, keep),
        )
        return out, mask

    # -- losses and inference --------------------------------------------------------------------
    def caption_loss(
        self,
        images: torch.Tensor,
        captions: torch.Tensor,
        caption_mask: torch.Tensor,
        prefix: TextPrefix | None = None,
        use_image: bool = True,
        count_correct: bool = False,
    ):
        """(sum of caption-token cross-entropies, number of caption tokens), plus, with `count_correct`,
        the number of caption tokens the LM ranks first (greedy next-token accuracy: the token error
        rate 1 - correct / n is the bounded error a scaling sweep fits). captions (B, L) right-padded."""
        b, length = captions.shape
        visual = self.visual_tokens(images, prefix=prefix) if use_image else None
        embeds, mask, n_before = self.sequence(visual, b, captions, caption_mask, with_prefix=prefix is None)
        if n_before == 0:  # the first caption token would have no position to be predicted from
            raise ValueError("nothing precedes the caption (no image, prompt or uncached prefix)")
        logits = self._run(embeds, mask, prefix, keep=length + 1)[0].logits[:, -(length + 1) : -1]  # (B, L, V)
        targets = captions.masked_fill(~caption_mask, IGNORE)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        if count_correct:
            return ce, caption_mask.sum(), ((logits.argmax(-1) == captions) & caption_mask).sum()
        return ce, caption_mask.sum()

    @torch.no_grad()
    def prefill_logits(self, images: torch.Tensor, prefix: TextPrefix | None = None) -> torch.Tensor:
        """Logits (B, M + P, V) at the visual and prompt positions (what follows the prefix)."""
        visual = self.visual_tokens(images, prefix=prefix)
        embeds, mask, _ = self.sequence(visual, images.shape[0], with_prefix=prefix is None)
        keep = visual.shape[1] + self.prompt_ids.numel()
        return self._run(embeds, mask, prefix, keep=keep)[0].logits[:, -keep:]

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_new_tokens: int, prefix: TextPrefix | None = None) -> torch.Tensor:
        """Greedy continuation (B, max_new_tokens) after [prefix][image][prompt]. With `prefix`, the
        prefix positions come from its cache instead of being recomputed; the tokens are the same."""
        visual = self.visual_tokens(images, prefix=prefix)
        b = images.shape[0]
        embeds, mask, _ = self.sequence(visual, b, with_prefix=prefix is None)
        out, mask = self._run(embeds, mask, prefix, keep=1, use_cache=True)
        cache = returned_cache(out)
        tokens = []
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)  # (B,)
            tokens.append(nxt)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            out = self.lm(
                inputs_embeds=self._embed(nxt[:, None]),
                attention_mask=mask,
                use_cache=True,
                **with_cache(self.lm, cache),
                **keep_last_logits(self.lm, 1),
            )
            cache = returned_cache(out)
        return torch.stack(tokens, dim=1)


def _kv_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each (B, heads, T, head_dim), across transformers versions."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


@dataclass
class TextPrefix:
    """The KV cache of a fixed token prefix (batch 1) and the LLM's hidden state at its last token."""

    ids: torch.Tensor  # (P,)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each (1, heads, P, head_dim)
    last_hidden: torch.Tensor  # (1, D_llm): the text embedding of the prefix (for text-conditioned compressors)
    lm_config: object = None

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    def for_batch(self, batch: int):
        """A fresh DynamicCache holding the prefix for `batch` sequences. The cache the LLM extends is
        new each time (generation appends to it in place); the prefix tensors are shared views."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.lm_config)
        except TypeError:  # older transformers: no config argument
            cache = DynamicCache()
        for layer, (k, v) in enumerate(self.kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
        return cache


@torch.no_grad()
def build_prefix(lm: nn.Module, ids: torch.Tensor) -> TextPrefix:
    """Run the LLM once over the prefix ids (P,) and keep its KV cache and last hidden state."""
    if ids.numel() == 0:
        raise ValueError("an empty prefix has nothing to cache")
    out = lm(input_ids=ids[None], use_cache=True, output_hidden_states=True, **keep_last_logits(lm, 1))
    return TextPrefix(
        ids.clone(),
        [(k.detach(), v.detach()) for k, v in _kv_pairs(returned_cache(out))],
        out.hidden_states[-1][:, -1].detach(),
        lm.config,
    )


def text_ids(tokenizer: CaptionTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text) if text else []


def bos_ids(tokenizer: CaptionTokenizer) -> list[int]:
    """[begin-of-sequence] when the tokenizer has one: pretrained LMs expect it first, and it gives
    the first caption token a position to be predicted from even with no image or prompt before it.
    CLIP's BPE: <start_of_text>; Hugging Face tokenizers: bos_token_id (Qwen2's has none)."""
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def build_text_tokenizer(text: TextSection) -> CaptionTokenizer:
    if text.tokenizer.kind == "hf" and not text.tokenizer.path:
        raise UserError(
            "config key 'text.tokenizer.path': required (set it in the config file or as text.tokenizer.path=...)"
        )
    return build_tokenizer(text.tokenizer)


def compressor_spec(compressor: CompressorSection, d_vis: int, d_llm: int, grid: tuple[int, int]) -> CompressorSpec:
    c = compressor
    return CompressorSpec(
        kind=c.kind,
        d_vis=d_vis,
        d_llm=d_llm,
        grid=grid,
        num_tokens=c.num_tokens or grid[0] * grid[1],
        hidden=c.hidden,
        heads=c.heads,
        layers=c.layers,
    )


def build_attachment(
    stage: int,
    encoder: EncoderSection,
    compressor: CompressorSection,
    lm: LMSection,
    text: TextSection,
    frozen_encoder=None,
    preprocessing=None,
) -> tuple[AttachedVLM, CaptionTokenizer]:
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
    vlm = AttachedVLM(
        frozen_encoder, build_compressor(spec), language_model, prefix, text_ids(tokenizer, text.prompt), preprocessing
    )
    return vlm, tokenizer
