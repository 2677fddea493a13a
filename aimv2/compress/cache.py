"""Text-prefix KV caching: the keys and values of a fixed text are computed once and reused for
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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aimv2.compress.lm import keep_last_logits, returned_cache


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
    return TextPrefix(ids.clone(), [(k.detach(), v.detach()) for k, v in _kv_pairs(returned_cache(out))],
                      out.hidden_states[-1][:, -1].detach(), lm.config)
