"""One visualization frame of a model on a batch: the prediction grid and the captions the decoder generates greedily.

Greedy captions from the AIMv2 decoder: what the text head says about an image.

The decoder sees [image features, start token, caption so far] under one causal mask, so generating
is: encode the image once, then repeatedly run the decoder on the tokens so far and append the arg
max of the vocabulary logits at the last position, until end-of-text. There is no KV cache: captions
are short and this runs on a handful of images, so clarity wins.

The encoder runs with the longest prefix pre-training ever drew (M = N - 1): every patch is visible,
and the decoder's text positions see features of the kind they were trained on.

One visualization frame of a model on a batch: the prediction grid and the generated captions.

Shared by the training callback (a frame every N steps, on a fixed batch) and `aimv2 visualize`
(a frame of a checkpoint on chosen images), so both draw exactly the same picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.fileio import markdown_table
from aimv2.models.aimv2 import AIMv2
from aimv2.models.encoder import encode
from aimv2.viz.prediction_grid import prediction_grid


@torch.no_grad()
def greedy_tokens(
    model: AIMv2, images: torch.Tensor, eot_id: int, max_tokens: int = 20, stop_early: bool = True
) -> list[list[int]]:
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


def generate_captions(
    model: AIMv2, images: torch.Tensor, tokenizer: CaptionTokenizer, max_tokens: int = 20, stop_early: bool = True
) -> list[str]:
    """Greedy captions (text) for images (B, 3, H, W) in model space."""
    ids = greedy_tokens(model, images, tokenizer.eot_id, max_tokens, stop_early)
    return [tokenizer.decode(row) for row in ids]


@dataclass
class Frame:
    image: Image.Image  # the grid
    prefix_lengths: list[int]
    num_patches: int
    true_captions: list[str | None] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)  # empty when no tokenizer was given

    def captions_markdown(self) -> str:
        """A Markdown table of true vs generated captions (what TensorBoard's text tab renders)."""
        if not self.generated:
            return "(no captions: no tokenizer)"
        true = [t or "-" for t in self.true_captions] + ["-"] * (len(self.generated) - len(self.true_captions))
        rows = [[i, true[i], gen or "(empty)"] for i, gen in enumerate(self.generated)]
        return markdown_table(["#", "true caption", "generated (greedy)"], rows)


def fixed_prefix_lengths(batch_size: int, num_patches: int, ratio: float, device=None) -> torch.Tensor:
    """(B,) prefix lengths round(ratio * N), kept within the training range [1, N - 1]."""
    m = min(max(int(round(ratio * num_patches)), 1), num_patches - 1)
    return torch.full((batch_size,), m, dtype=torch.long, device=device)


@torch.no_grad()
def make_frame(
    model: AIMv2,
    images: torch.Tensor,
    prefix_ratio: float = 0.5,
    *,
    tokenizer: CaptionTokenizer | None = None,
    true_captions: list[str | None] | None = None,
    max_caption_tokens: int = 20,
    stop_early: bool = True,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
) -> Frame:
    """Run the model on `images` (B, 3, H, W), normalized with mean/std, and draw the frame."""
    param = next(model.parameters())
    images = images.to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        num_patches = model.patches_of(images)
        prefix = fixed_prefix_lengths(images.shape[0], num_patches, prefix_ratio, images.device)
        dummy = torch.zeros((images.shape[0], 1), dtype=torch.long, device=images.device)
        pixels, _ = model(images, dummy, prefix)  # (B, N, P); the one text position is ignored
        generated = (
            generate_captions(model, images, tokenizer, max_caption_tokens, stop_early)
            if tokenizer is not None and max_caption_tokens > 0
            else []
        )
    finally:
        model.train(was_training)
    true_captions = list(true_captions or [])
    notes = []
    for i, m in enumerate(prefix.tolist()):
        line = f"prefix {m}/{num_patches} patches"
        if i < len(true_captions) and true_captions[i]:
            line += f" | true: {true_captions[i]}"
        notes.append([line] + ([f"generated: {generated[i] or '(empty)'}"] if generated else []))
    image = prediction_grid(
        images.float().cpu(), pixels.float().cpu(), prefix.cpu(), model.patch_size, mean, std, notes
    )
    return Frame(image, prefix.tolist(), num_patches, true_captions, generated)
