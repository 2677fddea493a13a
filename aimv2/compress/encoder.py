"""The frozen vision encoder of an attachment: loading it (through `aimv2.load_encoder`), its patch
grid and width, and its last attention keys (for key-diversity pruning)."""

from __future__ import annotations

import torch
from torch import nn

from aimv2.errors import UserError


def load_frozen_encoder(source: str, img_size: int = 0):
    """(encoder in eval mode with requires_grad off, Preprocessing) from any source
    `aimv2.load_encoder` reads (a pretrain .ckpt, a ZeRO directory, timm/transformers/aimv2 exports,
    Apple's release); img_size=0 keeps the encoder's own resolution."""
    from aimv2 import load_encoder

    encoder, preprocessing = load_encoder(source, img_size=img_size or None)
    return freeze(encoder), preprocessing


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def patch_grid(encoder: nn.Module) -> tuple[int, int]:
    """(gh, gw) of a timm ViT's patch embedding at its current input size."""
    try:
        gh, gw = encoder.patch_embed.grid_size
    except AttributeError:
        raise UserError(f"encoder.source: {type(encoder).__name__} has no patch_embed.grid_size (a timm ViT is expected)") from None
    return int(gh), int(gw)


def encoder_width(encoder: nn.Module) -> int:
    return int(getattr(encoder, "embed_dim", None) or encoder.num_features)


class LastKeys:
    """Captures the keys (B, N, D) of the encoder's last attention layer during a forward pass, for
    key-diversity pruning: a forward hook on the fused qkv projection of timm's Attention."""

    def __init__(self, encoder: nn.Module):
        attn = encoder.blocks[-1].attn
        if not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise UserError("compressor.kind=kdv needs a timm ViT whose last block has a fused qkv projection")
        self.attn, self.prefix = attn, int(getattr(encoder, "num_prefix_tokens", 0))
        self.keys: torch.Tensor | None = None
        self.handle = attn.qkv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output: torch.Tensor) -> None:
        b, t, three_d = output.shape
        d = three_d // 3
        heads = self.attn.num_heads
        k = output[..., d:2 * d].reshape(b, t, heads, d // heads)
        k = self.attn.k_norm(k)  # identity for AIMv2; QK-norm models normalize keys per head
        self.keys = k.reshape(b, t, d)[:, self.prefix:]  # patches only (AIMv2 has no prefix tokens)

    def pop(self) -> torch.Tensor:
        keys, self.keys = self.keys, None
        if keys is None:
            raise RuntimeError("no keys captured: run the encoder first")
        return keys


def encode_patches(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch features (B, N, D) after the final norm. Prefix tokens (class/register), which AIMv2
    does not have, are dropped by count, never by assuming token 0 is one."""
    features = encoder.forward_features(images)
    return features[:, int(getattr(encoder, "num_prefix_tokens", 0)):]
