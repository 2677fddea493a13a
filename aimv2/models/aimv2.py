"""AIMv2 for pre-training: the timm encoder with prefix attention feeding the multimodal decoder."""

from __future__ import annotations

import torch
from torch import nn

from aimv2.models.decoder import MultimodalDecoder, decoder_kwargs
from aimv2.models.encoder import build_encoder, encode, grid_of
from aimv2.models.init import init_encoder
from aimv2.models.masks import (
    as_bias,
    packed_decoder_block_mask,
    packed_decoder_mask,
    packed_encoder_block_mask,
    packed_encoder_mask,
)
from aimv2.models.native import build_native_encoder, encode_packed
from aimv2.models.sizes import SizeSpec


class AIMv2(nn.Module):
    """Single-device module; strategies, compile and checkpointing are applied from outside."""

    def __init__(self, spec: SizeSpec, img_size: int, vocab_size: int, max_text_len: int = 77, native: bool = False):
        """`native`: the encoder takes any grid (2-D sin-cos positions, aimv2.models.native) and the
        model packed rows (`forward_packed`); `img_size` is then its nominal size."""
        super().__init__()
        self.spec = spec
        self.img_size = img_size
        self.encoder = build_native_encoder(spec, img_size) if native else build_encoder(spec, img_size)
        init_encoder(self.encoder)  # the reference trainer's init, not timm's (aimv2/models/init.py)
        self.num_patches = self.encoder.patch_embed.num_patches
        self.decoder = MultimodalDecoder(**decoder_kwargs(spec, vocab_size, max_text_len))

    @classmethod
    def from_parts(cls, encoder: nn.Module, decoder: MultimodalDecoder, spec: SizeSpec | None = None) -> AIMv2:
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

    def patches_of(self, images: torch.Tensor) -> int:
        """Patches per image of `images` (B, 3, H, W): `num_patches` at the fixed size, any grid for a
        native encoder."""
        gh, gw = grid_of(self.encoder, images)
        return gh * gw

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

    def forward_packed(
        self,
        patches: torch.Tensor,
        tokens: torch.Tensor,
        layout: dict,
        prefix_lengths: torch.Tensor | None,
        backend: str = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows of images of any grid (a native encoder, aimv2.models.native): patches
        (R, T, p*p*3) normalized, tokens (n, L), the layout of aimv2.models.native, prefix_lengths
        (n,) -> pixel predictions (K, p*p*3) and logits (n_real, V); each image's terms equal those of
        `forward` on that image alone. backend: "sdpa" (dense additive masks, built once for all
        layers) or "flex" (FlexAttention block masks; aimv2.models.encoder.attention_backend)."""
        if backend == "flex":
            enc_mask = packed_encoder_block_mask(layout["patch_image"], layout["patch_pos"], prefix_lengths)
            dec_mask = packed_decoder_block_mask(layout["dec_image"])
        else:
            dtype = patches.dtype if patches.is_floating_point() else torch.float32
            enc_mask = as_bias(packed_encoder_mask(layout["patch_image"], layout["patch_pos"], prefix_lengths), dtype)
            dec_mask = as_bias(packed_decoder_mask(layout["dec_image"]), dtype)
        features = encode_packed(self.encoder, patches, layout["coords"], enc_mask)  # (R, T, D)
        return self.decoder.forward_packed(features, tokens, layout, dec_mask)
