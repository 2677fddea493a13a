"""Attention-path benchmark for the encoder's prefix mask: forward + backward of one attention call at
the bench shape under each way of expressing the mask, timed in alternation, against the unmasked
and the causal call as lower bounds. Writes benchmarks/results/attention.{json,md}.

    .venv/bin/python benchmarks/attention.py                          # CPU: batch 8, 6 heads, 256 tokens, fp32
    .venv/bin/python benchmarks/attention.py --device cuda --batch 64 --heads 8 --dtype bf16

Variants: SDPA with the boolean mask (SDPA turns it into an additive one inside every call); SDPA
with the additive bias built once per step (what aimv2.models.encoder passes); FlexAttention with a
block mask (compiled; built every step, as the prefix lengths change every step), where the device
supports its backward (not on the CPU in torch 2.15). On CUDA, SDPA's own backend choice decides
between the memory-efficient and cuDNN kernels; flash attention refuses any explicit mask.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aimv2.models.masks import prefix_attention_bias, prefix_attention_mask, sample_prefix_lengths  # noqa: E402
from common import alternate, machine, machine_line, median, publish, table  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def flex_variant(q, k, v, lengths, n: int):
    """FlexAttention with a block mask rebuilt per call, or the reason it cannot train here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        return None, f"unavailable: {err}"
    flex = torch.compile(flex_attention)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < lengths[b])

    def run():
        block = create_block_mask(mask_mod, q.shape[0], None, n, n, device=q.device.type)
        return flex(q, k, v, block_mask=block)

    try:
        run().sum().backward()
    except Exception as err:  # e.g. "FlexAttention does not support backward on CPU"
        return None, f"not run: {str(err).splitlines()[0][:120]}"
    return run, None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    device, dtype, n = args.device, DTYPES[args.dtype], args.tokens
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(args.batch, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    lengths = sample_prefix_lengths(args.batch, n, device=device)

    def timed(make_out):
        def step():
            make_out().sum().backward()

        return step

    # Masks are built once per step and shared by every layer, so one layer's call gets them ready-made.
    mask, bias = prefix_attention_mask(lengths, n), prefix_attention_bias(lengths, n, dtype)
    variants = {
        "SDPA, boolean mask": timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        "SDPA, additive bias (ours)": timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)),
        "SDPA, no mask (lower bound)": timed(lambda: F.scaled_dot_product_attention(q, k, v)),
        "SDPA, is_causal (lower bound)": timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }
    flex, why_not = flex_variant(q, k, v, lengths, n)
    if flex is not None:
        variants["FlexAttention, block mask per step"] = timed(flex)
    times = alternate(variants, args.rounds, args.steps, device)
    base = median(times["SDPA, additive bias (ours)"])
    rows = [[name, f"{1e3 * median(ts):.2f}", f"{median(ts) / base:.2f}x"] for name, ts in times.items()]
    if why_not:
        rows.append(["FlexAttention, block mask per step", why_not, "-"])
    info = machine(device)
    result = {
        **info,
        "shape": [args.batch, args.heads, n, args.head_dim],
        "dtype": args.dtype,
        "ms_fwd_bwd": {name: round(1e3 * median(ts), 3) for name, ts in times.items()},
        "flex": why_not or "measured",
    }
    md = [
        f"# Prefix-mask attention paths ({info['date']})",
        "",
        f"Machine: {machine_line(info)}. q, k, v of shape {tuple(result['shape'])} ({args.dtype}); "
        f"one layer's call, forward + backward, masks built beforehand (once per step, shared by the layers); "
        f"medians of {args.rounds} alternating rounds of {args.steps}.",
        "",
    ]
    md += table(["variant", "ms (fwd + bwd)", "vs ours"], rows)
    publish("attention" if device == "cpu" else "attention_gpu", result, md)
    return result


if __name__ == "__main__":
    main()
