"""The attachment: frozen encoder -> compressor -> causal LM, with exact visual-token bookkeeping.

The LLM sees `inputs_embeds` laid out as

    [prefix P0] [visual M] [prompt P] [caption L]      (S = P0 + M + P + L positions)

and only caption tokens are predicted: labels are -100 on the prefix, visual and prompt positions
and on caption padding (the Hugging Face convention: labels[t] is the token at position t; the
model's output at t-1 predicts it). Captions are right-padded; padding is masked out of attention.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aimv2.compress.base import Compressor
from aimv2.compress.cache import TextPrefix
from aimv2.compress.encoder import LastKeys, encode_patches
from aimv2.compress.lm import keep_last_logits, returned_cache, with_cache
from aimv2.models.encoder import grid_of

IGNORE = -100


def caption_labels(n_before: int, captions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels (B, n_before + L): -100 on the n_before non-caption positions and on padding."""
    before = torch.full((captions.shape[0], n_before), IGNORE, dtype=torch.long, device=captions.device)
    return torch.cat([before, captions.masked_fill(~mask, IGNORE)], dim=1)


class AttachedVLM(nn.Module):
    """encoder (frozen) + compressor + LM. `lm` may be None for a front end that only makes visual tokens."""

    def __init__(self, encoder: nn.Module, compressor: Compressor, lm: Optional[nn.Module],
                 prefix_ids: list[int] = (), prompt_ids: list[int] = (), preprocessing=None):
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

    def train(self, mode: bool = True) -> "AttachedVLM":
        """The encoder always runs in eval mode; so does the LM while it is frozen (stage 1)."""
        super().train(mode)
        self.encoder.eval()
        if self.lm is not None and not any(p.requires_grad for p in self.lm.parameters()):
            self.lm.eval()
        return self

    # -- visual tokens -------------------------------------------------------------------------
    def text_condition(self, text_ids: Optional[torch.Tensor] = None,
                       prefix: Optional[TextPrefix] = None) -> Optional[torch.Tensor]:
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
        out = self.lm(input_ids=text_ids.reshape(1, -1), output_hidden_states=True, use_cache=False,
                      **keep_last_logits(self.lm, 1))
        return out.hidden_states[-1][:, -1]

    def visual_tokens(self, images: torch.Tensor, text: Optional[torch.Tensor] = None,
                      prefix: Optional[TextPrefix] = None) -> torch.Tensor:
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

    def sequence(self, visual: Optional[torch.Tensor], batch: int, captions: Optional[torch.Tensor] = None,
                 caption_mask: Optional[torch.Tensor] = None, with_prefix: bool = True):
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

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, prefix: Optional[TextPrefix], keep: int,
             use_cache: bool = False):
        """One LM forward -> (output, attention mask incl. the prefix). With a prefix, its cache
        stands in for the prefix positions (a cache is then always returned)."""
        cache = None
        if prefix is not None:
            b = embeds.shape[0]
            cache, use_cache = prefix.for_batch(b), True
            mask = torch.cat([torch.ones(b, prefix.length, dtype=mask.dtype, device=mask.device), mask], dim=1)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=use_cache, **with_cache(self.lm, cache),
                      **keep_last_logits(self.lm, keep))
        return out, mask

    # -- losses and inference --------------------------------------------------------------------
    def caption_loss(self, images: torch.Tensor, captions: torch.Tensor, caption_mask: torch.Tensor,
                     prefix: Optional[TextPrefix] = None, use_image: bool = True, count_correct: bool = False):
        """(sum of caption-token cross-entropies, number of caption tokens), plus, with `count_correct`,
        the number of caption tokens the LM ranks first (greedy next-token accuracy: the token error
        rate 1 - correct / n is the bounded error a scaling sweep fits). captions (B, L) right-padded."""
        b, length = captions.shape
        visual = self.visual_tokens(images, prefix=prefix) if use_image else None
        embeds, mask, n_before = self.sequence(visual, b, captions, caption_mask, with_prefix=prefix is None)
        if n_before == 0:  # the first caption token would have no position to be predicted from
            raise ValueError("nothing precedes the caption (no image, prompt or uncached prefix)")
        logits = self._run(embeds, mask, prefix, keep=length + 1)[0].logits[:, -(length + 1):-1]  # (B, L, V)
        targets = captions.masked_fill(~caption_mask, IGNORE)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        if count_correct:
            return ce, caption_mask.sum(), ((logits.argmax(-1) == captions) & caption_mask).sum()
        return ce, caption_mask.sum()

    @torch.no_grad()
    def prefill_logits(self, images: torch.Tensor, prefix: Optional[TextPrefix] = None) -> torch.Tensor:
        """Logits (B, M + P, V) at the visual and prompt positions (what follows the prefix)."""
        visual = self.visual_tokens(images, prefix=prefix)
        embeds, mask, _ = self.sequence(visual, images.shape[0], with_prefix=prefix is None)
        keep = visual.shape[1] + self.prompt_ids.numel()
        return self._run(embeds, mask, prefix, keep=keep)[0].logits[:, -keep:]

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_new_tokens: int, prefix: Optional[TextPrefix] = None) -> torch.Tensor:
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
            out = self.lm(inputs_embeds=self._embed(nxt[:, None]), attention_mask=mask, use_cache=True,
                          **with_cache(self.lm, cache), **keep_last_logits(self.lm, 1))
            cache = returned_cache(out)
        return torch.stack(tokens, dim=1)
