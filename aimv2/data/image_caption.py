"""Image-caption samples into training batches: the per-sample processor the stream's workers run
(decode, transform, caption) and the collator that tokenizes and stacks. Shared by pre-training and
compressor alignment."""

from __future__ import annotations

import torch

from aimv2.data.samples import decode_caption, decode_image
from aimv2.data.tokenizer import CaptionTokenizer


class ImageCaptionProcessor:
    """One raw sample -> (image tensor (3, H, W), caption); raises CorruptSample when unusable.
    `decode` gives what `transform` takes: a PIL image (default) or a uint8 tensor."""

    def __init__(self, transform, decode=decode_image):
        self.transform, self.decode = transform, decode

    def __call__(self, sample: dict) -> tuple[torch.Tensor, str]:
        caption = decode_caption(sample)
        return self.transform(self.decode(sample)), caption


class ImageCaptionCollator:
    def __init__(self, tokenizer: CaptionTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[torch.Tensor, str]]) -> dict:
        """An empty list (an evaluation batch of corrupt samples only) gives empty tensors."""
        tokens, mask = self.tokenizer([caption for _, caption in items])
        if not items:
            return {"image": torch.empty(0), "tokens": tokens, "token_mask": mask,
                    "token_index": torch.empty(0, dtype=torch.long)}
        # Flat positions of the real tokens, found here on the host: packing the logits on the device
        # by the boolean mask would stall the step on a device-to-host sync.
        return {"image": torch.stack([image for image, _ in items]), "tokens": tokens, "token_mask": mask,
                "token_index": mask.flatten().nonzero().squeeze(1)}
