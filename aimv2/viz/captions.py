"""Greedy captions from the AIMv2 decoder: what the text head says about an image.

The decoder sees [image features, start token, caption so far] under one causal mask, so generating
is: encode the image once, then repeatedly run the decoder on the tokens so far and append the arg
max of the vocabulary logits at the last position, until end-of-text. There is no KV cache: captions
are short and this runs on a handful of images, so clarity wins.

The encoder runs with the longest prefix pre-training ever drew (M = N - 1): every patch is visible,
and the decoder's text positions see features of the kind they were trained on.
"""

from __future__ import annotations

import torch

from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.models.aimv2 import AIMv2
from aimv2.models.encoder import encode


@torch.no_grad()
def greedy_tokens(model: AIMv2, images: torch.Tensor, eot_id: int, max_tokens: int = 20,
                  stop_early: bool = True) -> list[list[int]]:
    """Greedy token ids per image (end-of-text excluded), at most `max_tokens` each.

    `stop_early=False` always runs `max_tokens` decoder passes, so that every process of a sharded
    model (FSDP, ZeRO-3) makes the same number of collective calls.
    """
    b, n = images.shape[0], model.patches_of(images)
    steps = max(0, min(max_tokens, model.decoder.max_text_len))
    features = encode(model.encoder, images, torch.full((b,), n - 1, dtype=torch.long, device=images.device))
    tokens = torch.zeros((b, steps + 1), dtype=torch.long, device=images.device)  # last column: a placeholder
    done = torch.zeros(b, dtype=torch.bool, device=images.device)
    for t in range(steps):
        current = tokens[:, : t + 1]  # the decoder's text input is [start, tokens[:, :t]]
        last = torch.zeros_like(current, dtype=torch.bool)
        last[:, t] = True
        _, logits = model.decoder(features, current, last)  # (B, V): the logits at position t
        tokens[:, t] = torch.where(done, eot_id, logits.argmax(-1))
        done |= tokens[:, t] == eot_id
        if stop_early and bool(done.all()):
            break
    result = []
    for row in tokens[:, :steps].tolist():
        result.append(row[: row.index(eot_id)] if eot_id in row else row)
    return result


def generate_captions(model: AIMv2, images: torch.Tensor, tokenizer: CaptionTokenizer, max_tokens: int = 20,
                      stop_early: bool = True) -> list[str]:
    """Greedy captions (text) for images (B, 3, H, W) in model space."""
    ids = greedy_tokens(model, images, tokenizer.eot_id, max_tokens, stop_early)
    return [tokenizer.decode(row) for row in ids]
