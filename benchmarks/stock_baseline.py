"""The obvious alternative to this project's model, built from stock parts, for the training-step
benchmark: timm's ViT with the same AIMv2 architecture but no attention mask (bidirectional), and a
straightforward causal decoder from torch.nn (pre-norm TransformerEncoderLayer with a causal mask,
GELU MLP sized to the same FLOPs as the SwiGLU one, no biases), whose vocabulary head runs over every
caption position, padding included, with cross_entropy(ignore_index). Default (foreach) AdamW.
Same widths, depths and heads as the size row, so the two do the same matmul work per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aimv2.models.encoder import build_encoder
from aimv2.models.sizes import SizeSpec
from aimv2.objective import normalize_patches, patchify


class StockDecoder(nn.Module):
    def __init__(self, spec: SizeSpec, vocab_size: int, max_text_len: int):
        super().__init__()
        width = spec.decoder_width
        self.image_proj = nn.Linear(spec.width, width, bias=False)
        self.text_embed = nn.Embedding(vocab_size, width)
        self.start_token = nn.Parameter(torch.zeros(1, 1, width))
        self.text_pos_embed = nn.Parameter(torch.zeros(1, max_text_len, width))
        # A GELU MLP of hidden 1.5 H has the matmul FLOPs of a SwiGLU MLP of hidden H.
        layer = nn.TransformerEncoderLayer(
            width,
            spec.decoder_heads,
            dim_feedforward=spec.decoder_mlp_hidden * 3 // 2,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
            bias=False,
        )
        self.blocks = nn.TransformerEncoder(layer, spec.decoder_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width, bias=False)
        self.pixel_head = nn.Linear(width, spec.patch_size**2 * 3, bias=False)
        self.text_head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = features.shape[1]
        start = self.start_token.expand(tokens.shape[0], -1, -1)
        text = torch.cat([start, self.text_embed(tokens[:, :-1])], dim=1) + self.text_pos_embed[:, : tokens.shape[1]]
        x = torch.cat([self.image_proj(features), text], dim=1)  # (B, N + L, W)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        x = self.norm(self.blocks(x, mask=mask, is_causal=True))
        return self.pixel_head(x[:, :n]), self.text_head(x[:, n:])  # (B, N, P), (B, L, V)


class StockAIMv2(nn.Module):
    def __init__(self, spec: SizeSpec, img_size: int, vocab_size: int, max_text_len: int = 77):
        super().__init__()
        self.patch_size = spec.patch_size
        self.encoder = build_encoder(spec, img_size)
        self.decoder = StockDecoder(spec, vocab_size, max_text_len)

    def loss(
        self, images: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, alpha: float = 0.4
    ) -> torch.Tensor:
        pixels, logits = self.decoder(self.encoder.forward_features(images), tokens)
        target = normalize_patches(patchify(images, self.patch_size))
        l_img = F.mse_loss(pixels[:, :-1], target[:, 1:])
        l_text = F.cross_entropy(
            logits.flatten(0, 1), tokens.masked_fill(~token_mask, -100).flatten(), ignore_index=-100
        )
        return l_text + alpha * l_img
