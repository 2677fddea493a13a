"""Initialization for pre-training, as Apple's reference trainer does it.

ml-l3m (configs/aimv2/001_aimv2_hfdata.yaml and the modules it names):

- every Linear of the encoder and decoder blocks: xavier_uniform (`weight_init_style: xavier_uniform`,
  src/l3m/model/trunks/transformer.py). Its q, k and v are three (D, D) Linears, so timm's fused
  (3D, D) qkv is initialized as three blocks (bound sqrt(6 / 2D), not sqrt(6 / 4D));
- the patch projection: xavier_uniform over its flattened (D, 3*p*p) weight, as MAE does
  (src/l3m/model/preprocessors/vision.py, ViTPreprocessor); its bias keeps PyTorch's default;
- position embeddings: the encoder's normal(0.02); the caption's normal(0.01); the start token and
  the token embedding normal(0.02) (TextPreprocessor);
- the image projection into the decoder: PyTorch's default Linear init (a plain nn.Linear there);
- the pixel and vocabulary heads: truncated normal, fan-in variance scaled by 1 / (1 + decoder
  depth) (`fan_in_depth_scaled`, src/l3m/model/heads/classifier.py);
- norms: weight 1.

Why not timm's init: its ViT draws every Linear from trunc_normal(0.02) and sets the gate of each
SwiGLU (fc1_g) to std 1e-6, so every encoder MLP starts switched off; the reference starts them on.
Only pre-training uses this: loaded encoders (probe, compress, exports) get their weights from files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.layers.weight_init import variance_scaling_
from torch import nn

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from aimv2.models.decoder import MultimodalDecoder


@torch.no_grad()
def init_blocks(blocks: nn.Module) -> None:
    """xavier_uniform for every Linear of a stack of timm Blocks; fused qkv as three square blocks."""
    for name, module in blocks.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.endswith("attn.qkv"):
            for part in module.weight.chunk(3, dim=0):  # q, k, v: contiguous row blocks, views
                nn.init.xavier_uniform_(part)
        else:
            nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@torch.no_grad()
def init_encoder(encoder: VisionTransformer) -> None:
    init_blocks(encoder.blocks)
    weight = encoder.patch_embed.proj.weight  # (D, 3, p, p)
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # as a (D, 3*p*p) Linear
    if encoder.pos_embed is not None:  # a native encoder's sin-cos embedding is fixed (aimv2.models.native)
        nn.init.normal_(encoder.pos_embed, std=0.02)


@torch.no_grad()
def init_decoder(decoder: MultimodalDecoder) -> None:
    init_blocks(decoder.blocks)
    decoder.image_proj.reset_parameters()
    nn.init.normal_(decoder.text_embed.weight, std=0.02)
    nn.init.normal_(decoder.text_pos_embed, std=0.01)
    nn.init.normal_(decoder.start_token, std=0.02)
    scale = 1 / (1 + len(decoder.blocks))
    for head in (decoder.pixel_head, decoder.text_head):
        variance_scaling_(head.weight, scale=scale, mode="fan_in", distribution="truncated_normal")
