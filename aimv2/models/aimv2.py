"""AIMv2 for pre-training: the timm encoder with prefix attention feeding the multimodal decoder."""

from __future__ import annotations

import torch
from torch import nn

from aimv2.models.decoder import MultimodalDecoder, decoder_kwargs
from aimv2.models.encoder import build_encoder, encode
from aimv2.models.init import init_encoder
from aimv2.models.sizes import SizeSpec


class AIMv2(nn.Module):
    """Single-device module; strategies, compile and checkpointing are applied from outside."""

    def __init__(self, spec: SizeSpec, img_size: int, vocab_size: int, max_text_len: int = 77):
        super().__init__()
        self.spec = spec
        self.img_size = img_size
        self.encoder = build_encoder(spec, img_size)
        init_encoder(self.encoder)  # the reference trainer's init, not timm's (aimv2/models/init.py)
        self.num_patches = self.encoder.patch_embed.num_patches
        self.decoder = MultimodalDecoder(**decoder_kwargs(spec, vocab_size, max_text_len))

    @classmethod
    def from_parts(cls, encoder: nn.Module, decoder: MultimodalDecoder, spec: SizeSpec | None = None) -> "AIMv2":
        """An AIMv2 around an encoder and a decoder that already hold their weights (a checkpoint read by
        aimv2.checkpoints); `spec` is None when the checkpoint does not name a row of the size table."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.spec = spec
        model.img_size = int(encoder.patch_embed.img_size[0])
        model.encoder, model.decoder = encoder, decoder
        model.num_patches = encoder.patch_embed.num_patches
        return model

    @property
    def patch_size(self) -> int:
        return int(self.encoder.patch_embed.patch_size[0])

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        prefix_lengths: torch.Tensor | None,
        text_mask: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), tokens (B, L), prefix_lengths (B,) -> pixels (B, N, p*p*3) and
        logits (B, L, V), or (n, V) at the True positions of text_mask (B, L) / at the flat positions
        text_index (n,) (sync-free)."""
        features = encode(self.encoder, images, prefix_lengths)  # (B, N, D)
        return self.decoder(features, tokens, text_mask, text_index)
