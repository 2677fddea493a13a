"""Scale-out measurements on GPUs (figures, not tests): for each strategy preset, a paper recipe
exactly as shipped (default configs/pretrain/aimv2_large_224.yaml: bf16-mixed, gradient clipping 1.0,
fused AdamW, its lr, betas and batch per GPU) on synthetic shards with the offline CLIP tokenizer, on
one node: its peak GPU memory, samples/s and MFU, a save, a resume to 20 more steps (the global step
checked), and the conversion of the checkpoint (ZeRO directory or file) to an fp32 encoder export.
Writes benchmarks/results/scaleout.json and scaleout.md.

    .venv/bin/python benchmarks/scaleout.py [--config configs/pretrain/aimv2_large_224.yaml] [--size SIZE] \\
        [--steps 200] [--batch 32] [--strategies ddp deepspeed_zero2 deepspeed_zero3 fsdp] [--devices 1]

Each strategy runs in its own process (clean memory statistics). Needs CUDA (and deepspeed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def synthetic_shards(out: Path, n: int) -> str:
    import io

    from PIL import Image

    from aimv2.data.shards import ShardSample, write_shards

    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((256, 256, 3)) * 255).astype("uint8")).save(buf, "JPEG")
            yield ShardSample(key=f"{i:09d}", image=buf.getvalue(), image_ext="jpg", caption=f"synthetic image {i}")

    return write_shards(samples(), out, samples_per_shard=256, verify_images=False, progress=False).urls


def one(args) -> dict:
    """Run inside a fresh process: train, resume, export; return the figures."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from aimv2.commands.pretrain import strategy_preset
    from aimv2.config import load_config
    from aimv2.engine.logs import read_metric
    from aimv2.pretraining.pretrain import pretrain

    class PeakMemory(Callback):
        peak = 0.0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            PeakMemory.peak = max(PeakMemory.peak, torch.cuda.max_memory_allocated() / 2**30)

    from aimv2.engine.checkpointing import checkpoint_step
    from aimv2.models.sizes import get_size, training_flops_per_sample

    run = Path(args.work) / args.one
    # The recipe as shipped; only what this machine must change: data, tokenizer, one node, the step count.
    overrides = [
        f"run_dir={run}",
        f"data.sources=[{{urls: '{args.urls}'}}]",
        "data.tokenizer.kind=clip",
        "data.num_workers=8",
        "trainer.accelerator=gpu",
        f"trainer.devices={args.devices}",
        "trainer.num_nodes=1",
        f"trainer.max_steps={args.steps}",
        f"trainer.checkpoint_every_n_steps={args.steps}",
        "trainer.log_every_n_steps=5",
        "trainer.progress_bar=false",
        "visualize.every_n_steps=0",
        *([f"model.size={args.size}"] if args.size else []),
        *([f"data.batch_size={args.batch}"] if args.batch else []),
    ]
    files = [REPO / args.config, strategy_preset(args.one)]
    cfg = load_config(files, overrides)
    start = time.perf_counter()
    paths = pretrain(cfg, callbacks=[PeakMemory()])
    train_s = time.perf_counter() - start
    rates = [v for s, v in read_metric(paths.metrics, "train/samples_per_sec") if s > 10]
    start = time.perf_counter()
    pretrain(load_config(files, overrides + [f"trainer.max_steps={args.steps + 20}", "trainer.resume=auto"]))
    resume_s = time.perf_counter() - start
    last = paths.checkpoints / "last.ckpt"
    # FLOPs per sample at the caption lengths of the synthetic set (about 5 real tokens of 77 positions).
    flops = training_flops_per_sample(
        get_size(cfg.model.size), cfg.model.img_size, cfg.data.tokenizer.max_length, 5.0, 49408
    )["total"]
    rate = statistics.median(rates)
    start = time.perf_counter()
    export = subprocess.run(
        [sys.executable, "-m", "aimv2", "export", str(last), "--format", "timm", "--out", str(run / "export")],
        capture_output=True,
        text=True,
    )
    return {
        "strategy": args.one,
        "config": args.config,
        "size": cfg.model.size,
        "devices": args.devices,
        "batch_per_gpu": cfg.data.batch_size,
        "precision": cfg.trainer.precision,
        "grad_clip": cfg.optim.grad_clip,
        "peak_mem_gib": round(PeakMemory.peak, 2),
        "samples_per_sec": round(rate, 1),
        "mfu_vs_989_tflops": round(rate * flops / args.devices / 989e12, 4),
        "resumed_to_step": checkpoint_step(last),
        "train_s": round(train_s, 1),
        "resume_and_20_steps_s": round(resume_s, 1),
        "checkpoint": "directory" if last.is_dir() else "file",
        "export_ok": export.returncode == 0,
        "export_s": round(time.perf_counter() - start, 1),
        "export_error": export.stderr[-300:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/pretrain/aimv2_large_224.yaml", help="a pre-training recipe")
    p.add_argument("--size", default="", help="override model.size (default: the recipe's)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=0, help="override data.batch_size (default: the recipe's 32)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategies", nargs="+", default=["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--urls", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    import torch

    from aimv2.fileio import markdown_table

    if not torch.cuda.is_available():
        sys.exit("benchmarks/scaleout.py needs CUDA")
    work = Path(tempfile.mkdtemp(prefix="aimv2-scaleout-"))
    urls = synthetic_shards(work / "shards", 4096)
    rows = []
    for name in args.strategies:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                name,
                "--urls",
                urls,
                "--work",
                str(work),
                "--config",
                args.config,
                "--size",
                args.size,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--devices",
                str(args.devices),
            ],
            capture_output=True,
            text=True,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        rows.append(json.loads(line[7:]) if line else {"strategy": name, "error": proc.stderr[-500:]})
        print(rows[-1], flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "steps": args.steps,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaleout.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Scale-out: {args.config} ({args.size or 'its size'}), {args.devices} x {meta['gpu']}, {meta['date']}",
        "",
        f"`benchmarks/scaleout.py --steps {args.steps} --strategies {' '.join(args.strategies)}`",
        "",
        markdown_table(
            ["strategy", "peak GiB", "samples/s", "MFU (989 TFLOP/s)", "checkpoint", "resumed to step", "export ok"],
            [
                [
                    r["strategy"],
                    r.get("peak_mem_gib", "-"),
                    r.get("samples_per_sec", "-"),
                    r.get("mfu_vs_989_tflops", "-"),
                    r.get("checkpoint", "-"),
                    r.get("resumed_to_step", r.get("error", "-")[-120:]),
                    r.get("export_ok", "-"),
                ]
                for r in rows
            ],
        ),
    ]
    (RESULTS / "scaleout.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
