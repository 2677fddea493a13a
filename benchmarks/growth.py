"""Growth benchmark: training-step time and peak memory against batch size and against resolution
(224/336/448 px = 256/576/1024 tokens), with and without activation checkpointing. Each point runs
in a fresh process so its memory peak is its own. Writes benchmarks/results/growth.{json,md}.

    .venv/bin/python benchmarks/growth.py                         # CPU: size small, fp32
    .venv/bin/python benchmarks/growth.py --device cuda --size large --dtype bf16 --batches 32 64 128

Memory: on a GPU, torch.cuda.max_memory_allocated; on the CPU, the process's peak resident set
(ru_maxrss) minus its resident set once the model is built, i.e. gradients, AdamW moments and
activations (the first two are the same at every point, so differences between points are
activations).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, publish, sync, table  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**30


def measure(args) -> dict:
    """One point, in this (fresh) process."""
    import contextlib

    from aimv2.config import TrainerConfig
    from aimv2.engine.optim import build_optimizer
    from aimv2.engine.trainer import prepare_model
    from aimv2.models import AIMv2, get_size
    from aimv2.processes import tune_cpu_allocator
    from train_step import DTYPES, project_step, synthetic_batch

    device, dtype = args.device, DTYPES[args.dtype]
    if device == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(0)
    model = AIMv2(get_size(args.size), args.img_size, args.vocab, args.text_len).to(device)
    prepare_model(model, TrainerConfig(activation_checkpointing=args.ckpt))
    optimizer = build_optimizer(model, 1e-4, 1e-4, (0.9, 0.95), 1e-8)
    batch = synthetic_batch(args.batch, args.img_size, args.vocab, args.text_len, device)
    autocast = (
        contextlib.nullcontext if dtype == torch.float32 else lambda: torch.autocast(device.split(":")[0], dtype=dtype)
    )
    step = project_step(model, optimizer, batch, autocast)
    base = rss_gib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):  # the first allocates AdamW state; the allocator settles after a few
        step()
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base  # KiB -> GiB
    return {
        "batch": args.batch,
        "img_size": args.img_size,
        "tokens": (args.img_size // 14) ** 2,
        "activation_checkpointing": args.ckpt,
        "step_s": round(min(times), 4),
        "samples_per_s": round(args.batch / min(times), 2),
        "peak_gib": round(peak, 3),
        "step_s_all": [round(t, 4) for t in times],
    }


def run_point(args, batch: int, img_size: int, ckpt: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--point",
        "--device",
        args.device,
        "--size",
        args.size,
        "--dtype",
        args.dtype,
        "--batch",
        str(batch),
        "--img-size",
        str(img_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--vocab",
        str(args.vocab),
        "--text-len",
        str(args.text_len),
    ] + (["--ckpt"] if ckpt else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "out of memory" in out.stderr.lower():
            return {
                "batch": batch,
                "img_size": img_size,
                "tokens": (img_size // 14) ** 2,
                "activation_checkpointing": ckpt,
                "error": "out of memory",
            }
        raise RuntimeError(f"point batch={batch} img_size={img_size} ckpt={ckpt} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="small")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16], help="batch sweep at --batch-px")
    parser.add_argument("--batch-px", type=int, default=224, help="resolution of the batch sweep")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 336, 448])
    parser.add_argument("--res-batch", type=int, default=4, help="batch of the resolution sweep")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=49408)
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--name", default="growth")
    # one point (internal: the parent runs each point in a fresh process)
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--img-size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(measure(args)))
        return {}
    points = {(b, args.batch_px) for b in args.batches} | {(args.res_batch, r) for r in args.resolutions}
    rows = []
    for batch, img_size in sorted(points, key=lambda p: (p[1], p[0])):
        for ckpt in (False, True):
            point = run_point(args, batch, img_size, ckpt)
            print(json.dumps(point), flush=True)
            rows.append(point)
    info = machine(args.device)
    memory = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak RSS over the built model"
    result = {**info, "size": args.size, "dtype": args.dtype, "steps": args.steps, "memory": memory, "points": rows}
    md = [
        f"# Growth: step time and memory against batch and resolution ({info['date']})",
        "",
        f"Machine: {machine_line(info)}. Size `{args.size}`, {args.dtype}, one full training step (forward, loss, "
        f"backward, clip, AdamW), the best of {args.steps} steps after {args.warmup} warm-up steps (one process per "
        f"point cannot alternate with the others, so the best step stands for the machine's rate), each point in a "
        f"fresh process. "
        f"Memory = {memory} (GiB). Activation checkpointing wraps every encoder and decoder block.",
        "",
    ]
    header = [
        "batch",
        "px",
        "tokens",
        "step (s)",
        "samples/s",
        "memory (GiB)",
        "step, ckpt (s)",
        "memory, ckpt (GiB)",
        "ckpt time",
        "ckpt memory",
    ]
    by_key = {(r["batch"], r["img_size"], r["activation_checkpointing"]): r for r in rows}
    lines = []
    for batch, img_size in sorted(points, key=lambda p: (p[1], p[0])):
        plain, ckpt = by_key[(batch, img_size, False)], by_key[(batch, img_size, True)]
        if "error" in plain or "error" in ckpt:
            lines.append(
                [
                    batch,
                    img_size,
                    plain["tokens"],
                    plain.get("step_s", plain.get("error")),
                    "",
                    "",
                    ckpt.get("step_s", ckpt.get("error")),
                    "",
                    "",
                    "",
                ]
            )
            continue
        lines.append(
            [
                batch,
                img_size,
                plain["tokens"],
                plain["step_s"],
                plain["samples_per_s"],
                plain["peak_gib"],
                ckpt["step_s"],
                ckpt["peak_gib"],
                f"{ckpt['step_s'] / plain['step_s']:.2f}x",
                f"{ckpt['peak_gib'] / max(plain['peak_gib'], 1e-9):.2f}x",
            ]
        )
    md += table(header, lines)
    publish(args.name, result, md)
    return result


if __name__ == "__main__":
    main()
