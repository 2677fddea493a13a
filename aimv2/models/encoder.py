"""The AIMv2 encoder: timm's `aimv2_*` VisionTransformer, built from a row of the size table.

We deliberately do not write another ViT: timm's model already has the AIMv2 layout (RMSNorm after
the patch projection and after the last block, SwiGLU, no biases) and converts Apple's released
weights, so every checkpoint we write is a timm checkpoint.

timm's attention, which also takes a FlexAttention `BlockMask`: packed rows of the native model
(block-diagonal plus per-image prefix / causal masks) on a GPU.

With a tensor mask, or none, it is timm's own forward (SDPA). With a BlockMask the same projections
run around `flex_attention`, which skips the masked-out blocks instead of computing them: a packed row
of k images costs about 1/k of a dense masked call. On CUDA the kernel is compiled once per shape;
on the CPU FlexAttention has a forward only (torch's eager reference), so CPU training uses the
dense bias (aimv2.models.masks) and `attention_backend` says so.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from aimv2.models.masks import prefix_attention_bias
from aimv2.models.sizes import SizeSpec


def timm_encoder_kwargs(spec: SizeSpec, img_size: int) -> dict:
    """Keyword arguments that turn `timm.create_model(spec.timm_arch, ...)` into this encoder."""
    # int(width * ratio) must give exactly mlp_hidden: the half keeps float rounding from losing one.
    return dict(
        embed_dim=spec.width,
        depth=spec.depth,
        num_heads=spec.heads,
        mlp_ratio=(spec.mlp_hidden + 0.5) / spec.width,
        patch_size=spec.patch_size,
        img_size=img_size,
        num_classes=0,
    )


def build_encoder(spec: SizeSpec, img_size: int = 224, **timm_kwargs) -> VisionTransformer:
    if img_size % spec.patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {spec.patch_size}")
    # Our Attention subclass: timm's, which also takes FlexAttention block masks (aimv2.models.encoder).
    kwargs = timm_encoder_kwargs(spec, img_size) | {"attn_layer": Attention} | timm_kwargs
    return timm.create_model(spec.timm_arch, pretrained=False, **kwargs)


def grid_of(encoder: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of patches `images` (..., H, W) give: the nominal grid at the fixed size, any
    grid for a native encoder (aimv2.models.native)."""
    p = encoder.patch_embed.patch_size
    return images.shape[-2] // p[0], images.shape[-1] // p[1]


def encode(
    encoder: VisionTransformer, images: torch.Tensor, prefix_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Patch features (B, N, D) after the final norm; prefix attention when lengths are given."""
    mask = None
    if prefix_lengths is not None:
        # In the activations' dtype; under autocast SDPA casts it together with q, k and v.
        dtype = images.dtype if images.is_floating_point() else torch.float32
        gh, gw = grid_of(encoder, images)
        mask = prefix_attention_bias(prefix_lengths.to(images.device), gh * gw, dtype)
    return encoder.forward_features(images, attn_mask=mask)


_compiled = None


def _flex(q, k, v, block_mask: BlockMask) -> torch.Tensor:
    global _compiled
    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled is None:
        # Shapes change from batch to batch (the decoder row length follows the captions, a window's last
        # batch has fewer rows): the default lets the first recompile mark them dynamic instead of
        # compiling per shape until torch's recompile limit falls back to the eager, dense kernel.
        _compiled = torch.compile(flex_attention)
    return _compiled(q, k, v, block_mask=block_mask)


class Attention(TimmAttention):
    """Same parameters, names and SDPA path as timm's `Attention`; a BlockMask routes to FlexAttention."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if not isinstance(attn_mask, BlockMask):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.training and self.attn_drop.p > 0:
            raise ValueError("attention dropout is not supported with FlexAttention block masks")
        batch, length, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)
        x = _flex(q, k, v, attn_mask).transpose(1, 2).reshape(batch, length, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def attention_backend(requested: str, device: torch.device | str) -> str:
    """'flex' or 'sdpa' for packed rows: `auto` is flex on CUDA, the dense bias (SDPA) elsewhere."""
    cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return "flex" if cuda else "sdpa"
    if requested == "flex" and not cuda:
        raise ValueError(
            "model.attention=flex needs a CUDA GPU: FlexAttention has no CPU backward; use auto or sdpa here"
        )
    if requested not in ("flex", "sdpa"):
        raise ValueError(f"model.attention: {requested!r}; choose auto, sdpa or flex")
    return requested
