"""The shared causal multimodal decoder of AIMv2 and its two heads.

Sequence: [proj(encoder features) for the N patches] + [start token, caption tokens], one causal
transformer over all of it (image first, then text). The output at image position i predicts
patch i+1; the output at the start token and at caption token t predicts the next caption token.
Blocks are timm's `Block` (RMSNorm, SwiGLU, no biases) run with `is_causal=True`, which keeps the
fused SDPA kernels available (an explicit mask would rule out flash attention).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import RmsNorm, SwiGLU
from timm.models.vision_transformer import Block
from torch import nn

from aimv2.models.encoder import Attention
from aimv2.models.init import init_decoder
from aimv2.models.sizes import SizeSpec


def decoder_kwargs(spec: SizeSpec, vocab_size: int, max_text_len: int) -> dict:
    """`MultimodalDecoder` keyword arguments of a size: one function, so the model built for training
    (aimv2.models.aimv2) and the decoder read back from a checkpoint (aimv2.checkpoints.loading) agree."""
    return {
        "encoder_width": spec.width,
        "width": spec.decoder_width,
        "depth": spec.decoder_depth,
        "heads": spec.decoder_heads,
        "mlp_hidden": spec.decoder_mlp_hidden,
        "patch_dim": spec.patch_size * spec.patch_size * 3,
        "vocab_size": vocab_size,
        "max_text_len": max_text_len,
    }


class MultimodalDecoder(nn.Module):
    def __init__(
        self,
        encoder_width: int,
        width: int,
        depth: int,
        heads: int,
        mlp_hidden: int,
        patch_dim: int,
        vocab_size: int,
        max_text_len: int,
    ):
        super().__init__()
        norm = partial(RmsNorm, eps=1e-5)
        self.max_text_len = max_text_len
        # With a bias, as the reference trainer's plain nn.Linear (ml-l3m configs/aimv2: vision_preprocessor).
        self.image_proj = nn.Linear(encoder_width, width)
        self.text_embed = nn.Embedding(vocab_size, width)
        self.start_token = nn.Parameter(torch.zeros(1, 1, width))
        self.text_pos_embed = nn.Parameter(torch.zeros(1, max_text_len, width))
        self.blocks = nn.ModuleList(
            Block(
                width,
                heads,
                mlp_ratio=(mlp_hidden + 0.5) / width,
                qkv_bias=False,
                proj_bias=False,
                norm_layer=norm,
                mlp_layer=SwiGLU,
                act_layer=nn.SiLU,
                attn_layer=Attention,  # timm's, plus FlexAttention block masks (aimv2.models.encoder)
            )
            for _ in range(depth)
        )
        self.norm = norm(width)
        self.pixel_head = nn.Linear(width, patch_dim, bias=False)
        self.text_head = nn.Linear(width, vocab_size, bias=False)
        init_decoder(self)  # the reference trainer's init (aimv2/models/init.py)
        self.register_load_state_dict_pre_hook(_zero_image_proj_bias)

    def forward(
        self,
        image_features: torch.Tensor,
        tokens: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_features (B, N, D_enc), tokens (B, L) -> pixels (B, N, patch_dim), logits (B, L, V).

        The text input is [start, t_1 .. t_{L-1}], so logits[:, j] predicts tokens[:, j]. With a
        text_mask (B, L), logits are computed only where it is True and returned as (n_true, V):
        captions are mostly padding, and the vocabulary head is the decoder's largest matmul.
        text_index (n,), the flat positions of the True entries (the collator computes them on the
        host), gives the same result without the device-to-host sync that boolean indexing costs.
        """
        num_patches, text_len = image_features.shape[1], tokens.shape[1]
        if text_len > self.max_text_len:
            raise ValueError(f"caption length {text_len} exceeds the decoder's {self.max_text_len} positions")
        image = self.image_proj(image_features)  # (B, N, W)
        start = self.start_token.expand(tokens.shape[0], -1, -1)  # (B, 1, W)
        text = torch.cat([start, self.text_embed(tokens[:, :-1])], dim=1)  # (B, L, W)
        text = text + self.text_pos_embed[:, :text_len]
        x = torch.cat([image, text], dim=1)  # (B, N + L, W)
        for block in self.blocks:
            x = block(x, is_causal=True)
        x = self.norm(x)
        text_out = x[:, num_patches:]  # (B, L, W)
        if text_index is not None:
            text_out = text_out.flatten(0, 1).index_select(0, text_index)  # (n_true, W)
        elif text_mask is not None:
            text_out = text_out[text_mask]  # (n_true, W)
        return self.pixel_head(x[:, :num_patches]), self.text_head(text_out)

    def forward_packed(
        self, image_features: torch.Tensor, tokens: torch.Tensor, layout: dict, attn_mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows (aimv2.models.native): image_features (R, T, D_enc), tokens (n, L) ->
        pixel predictions (K, patch_dim) at layout["pixel_pred"] and logits (n_real, V) at
        layout["text_pred"]. attn_mask: (R, 1, S, S) bias from packed_decoder_mask, or a BlockMask."""
        num_images, text_len = tokens.shape
        if text_len > self.max_text_len:
            raise ValueError(f"caption length {text_len} exceeds the decoder's {self.max_text_len} positions")
        image = self.image_proj(image_features).flatten(0, 1)  # (R*T, W)
        start = self.start_token.expand(num_images, -1, -1)  # (n, 1, W)
        text = torch.cat([start, self.text_embed(tokens[:, :-1])], dim=1) + self.text_pos_embed[:, :text_len]
        table = torch.cat([image, text.flatten(0, 1), image.new_zeros(1, image.shape[-1])])  # (R*T + n*L + 1, W)
        x = table[layout["dec_source"]]  # (R, S, W)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        x = self.norm(x).flatten(0, 1)  # (R*S, W)
        return self.pixel_head(x[layout["pixel_pred"]]), self.text_head(x[layout["text_pred"]])


def _zero_image_proj_bias(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the image projection had a bias (the reference trainer's has one) load
    with a zero bias: the same function they computed."""
    weight = state_dict.get(prefix + "image_proj.weight")
    if weight is not None and prefix + "image_proj.bias" not in state_dict:
        state_dict[prefix + "image_proj.bias"] = weight.new_zeros(weight.shape[0])
