"""Training-step benchmark: samples/s, achieved FLOP/s and MFU of one AIMv2 pre-training step
(forward, both losses, backward, gradient clipping, AdamW), with MFU against the matmul peak measured
in the same run, and the same step of the stock baseline (benchmarks/stock_baseline.py) timed in
alternation with it. Writes benchmarks/results/train_step.{json,md}.

    .venv/bin/python benchmarks/train_step.py                      # CPU bench size: small, batch 8, 224 px, fp32
    .venv/bin/python benchmarks/train_step.py --device cuda --size large --batch 64 --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aimv2.engine.optim import build_optimizer  # noqa: E402
from aimv2.models import AIMv2, get_size  # noqa: E402
from aimv2.models.masks import sample_prefix_lengths  # noqa: E402
from aimv2.models.sizes import training_flops_per_sample  # noqa: E402
from aimv2.objective import aimv2_loss  # noqa: E402
from aimv2.processes import tune_cpu_allocator  # noqa: E402
from common import H200_BF16_PEAK, alternate, machine, machine_line, matmul_peak, median, publish, table  # noqa: E402
from stock_baseline import StockAIMv2  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synthetic_batch(batch: int, img_size: int, vocab: int, text_len: int, device: str, seed: int = 0) -> dict:
    """Normalized-looking images and captions of 8..32 real tokens (alt-text lengths), padded to text_len."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    tokens = torch.randint(1, vocab, (batch, text_len), generator=g)
    lengths = torch.randint(8, 33, (batch,), generator=g)
    mask = torch.arange(text_len)[None, :] < lengths[:, None]
    tokens = tokens.masked_fill(~mask, 0)
    return {"image": images.to(device), "tokens": tokens.to(device), "token_mask": mask.to(device)}


def project_step(model: AIMv2, optimizer, batch: dict, autocast, clip: float = 1.0):
    """The step as AIMv2PretrainModule + Lightning run it (recipe: clip 1.0, alpha 0.4)."""
    images, tokens, mask = batch["image"], batch["tokens"], batch["token_mask"]
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        prefix = sample_prefix_lengths(images.shape[0], model.num_patches, generator=generator).to(images.device)
        with autocast():
            pixels, logits = model(images, tokens, prefix, mask)
            loss = aimv2_loss(pixels, logits, images, tokens, mask, prefix, model.spec.patch_size).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def baseline_step(model: StockAIMv2, optimizer, batch: dict, autocast, clip: float = 1.0):
    def step() -> None:
        with autocast():
            loss = model.loss(batch["image"], batch["tokens"], batch["token_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--vocab", type=int, default=49408, help="the CLIP tokenizer's, the project default")
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per round and variant")
    parser.add_argument("--compile", action="store_true", help="also time the project step with compiled blocks")
    parser.add_argument("--name", default="train_step", help="results file name")
    args = parser.parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    if device == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(0)
    spec = get_size(args.size)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.split(":")[0], dtype=dtype)

    batch = synthetic_batch(args.batch, args.img_size, args.vocab, args.text_len, device)
    ours = AIMv2(spec, args.img_size, args.vocab, args.text_len).to(device)
    stock = StockAIMv2(spec, args.img_size, args.vocab, args.text_len).to(device)
    ours_opt = build_optimizer(ours, 1e-4, 1e-4, (0.9, 0.95), 1e-8)
    stock_opt = torch.optim.AdamW(stock.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    variants = {
        "aimv2": project_step(ours, ours_opt, batch, autocast),
        "stock baseline": baseline_step(stock, stock_opt, batch, autocast),
    }
    if args.compile:
        compiled = AIMv2(spec, args.img_size, args.vocab, args.text_len).to(device)
        for block in [*compiled.encoder.blocks, *compiled.decoder.blocks]:
            block.compile()
        variants["aimv2, compiled blocks"] = project_step(
            compiled, build_optimizer(compiled, 1e-4, 1e-4, (0.9, 0.95), 1e-8), batch, autocast
        )

    peak_before = matmul_peak(device, dtype)
    times = alternate(variants, args.rounds, args.steps, device)
    peak = max(peak_before, matmul_peak(device, dtype))  # before and after: the machine's best
    text_tokens = float(batch["token_mask"].sum())
    flops = training_flops_per_sample(spec, args.img_size, args.text_len, text_tokens / args.batch, args.vocab)
    step_flops = flops["total"] * args.batch
    rows, figures = [], {}
    base_time = median(times["stock baseline"])
    for name, ts in times.items():
        t = median(ts)
        achieved = step_flops / t
        figures[name] = {
            "step_s": round(t, 4),
            "step_s_rounds": [round(x, 4) for x in ts],
            "samples_per_s": round(args.batch / t, 2),
            "tflops": round(achieved / 1e12, 4),
            "mfu_vs_measured_peak": round(achieved / peak, 4),
            "time_vs_stock": round(t / base_time, 3),
        }
        if device.startswith("cuda") and dtype == torch.bfloat16:
            figures[name]["mfu_vs_989_tflops"] = round(achieved / H200_BF16_PEAK, 4)
        rows.append(
            [
                name,
                f"{t:.3f}",
                f"{args.batch / t:.2f}",
                f"{achieved / 1e9:.1f}",
                f"{100 * achieved / peak:.1f}%",
                f"{t / base_time:.3f}x",
            ]
        )
    info = machine(device)
    result = {
        **info,
        "size": args.size,
        "img_size": args.img_size,
        "batch": args.batch,
        "dtype": args.dtype,
        "vocab": args.vocab,
        "text_len": args.text_len,
        "real_text_tokens": text_tokens,
        "matmul_peak_tflops": round(peak / 1e12, 4),
        "step_tflop": round(step_flops / 1e12, 4),
        "flops_per_sample": {k: float(v) for k, v in flops.items()},
        "variants": figures,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }
    md = [
        f"# Training step ({info['date']})",
        "",
        f"Machine: {machine_line(info)}. Size `{args.size}` at {args.img_size} px, batch {args.batch}, {args.dtype}, "
        f"vocabulary {args.vocab}, captions padded to {args.text_len} ({text_tokens:.0f} real tokens in the batch).",
        f"One step = forward + AIMv2 loss + backward + clip + AdamW. Model FLOPs per step "
        f"{step_flops / 1e9:.1f} G (aimv2/models/sizes.py: 6 x params x tokens + 12 T^2 D per attention layer, "
        f"vocabulary head on real tokens only). Matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s "
        f"(best {'8192' if device.startswith('cuda') else '1536'}^3 {args.dtype} matmul). Medians of "
        f"{args.rounds} alternating rounds of {args.steps} steps.",
        "",
    ]
    md += table(["variant", "step (s)", "samples/s", "GFLOP/s", "MFU (measured peak)", "time vs stock"], rows)
    publish(args.name, result, md)
    return result


if __name__ == "__main__":
    main()
