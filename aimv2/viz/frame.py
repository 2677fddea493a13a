"""One visualization frame of a model on a batch: the prediction grid and the generated captions.

Shared by the training callback (a frame every N steps, on a fixed batch) and `aimv2 visualize`
(a frame of a checkpoint on chosen images), so both draw exactly the same picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.models.aimv2 import AIMv2
from aimv2.viz.captions import generate_captions
from aimv2.viz.grid import prediction_grid


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
        lines = ["| # | true caption | generated (greedy) |", "|---|---|---|"]
        for i, gen in enumerate(self.generated):
            true = self.true_captions[i] if i < len(self.true_captions) and self.true_captions[i] else "-"
            lines.append(f"| {i} | {_cell(true)} | {_cell(gen) or '(empty)'} |")
        return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def fixed_prefix_lengths(batch_size: int, num_patches: int, ratio: float, device=None) -> torch.Tensor:
    """(B,) prefix lengths round(ratio * N), kept within the training range [1, N - 1]."""
    m = min(max(int(round(ratio * num_patches)), 1), num_patches - 1)
    return torch.full((batch_size,), m, dtype=torch.long, device=device)


@torch.no_grad()
def make_frame(model: AIMv2, images: torch.Tensor, prefix_ratio: float = 0.5, *,
               tokenizer: CaptionTokenizer | None = None, true_captions: list[str | None] | None = None,
               max_caption_tokens: int = 20, stop_early: bool = True,
               mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> Frame:
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
        generated = (generate_captions(model, images, tokenizer, max_caption_tokens, stop_early)
                     if tokenizer is not None and max_caption_tokens > 0 else [])
    finally:
        model.train(was_training)
    true_captions = list(true_captions or [])
    notes = []
    for i, m in enumerate(prefix.tolist()):
        line = f"prefix {m}/{num_patches} patches"
        if i < len(true_captions) and true_captions[i]:
            line += f" | true: {true_captions[i]}"
        notes.append([line] + ([f"generated: {generated[i] or '(empty)'}"] if generated else []))
    image = prediction_grid(images.float().cpu(), pixels.float().cpu(), prefix.cpu(), model.patch_size,
                            mean, std, notes)
    return Frame(image, prefix.tolist(), num_patches, true_captions, generated)
