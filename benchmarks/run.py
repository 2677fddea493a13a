"""Run every benchmark, each in its own process, then write benchmarks/results/summary.md: each
figure beside its target (issue 7), met or not, with the GPU items marked "not measured" when
there is no GPU.

    .venv/bin/python benchmarks/run.py              # CPU figures, about 15 minutes on 2 cores
    .venv/bin/python benchmarks/run.py --gpu        # also the H200 items (needs CUDA)
    .venv/bin/python benchmarks/run.py --only summary   # rewrite the summary from the stored JSON

Run it on a quiet machine: every figure is a rate, and other load lowers them unevenly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, machine, machine_line, table, write_results  # noqa: E402

CPU_JOBS = {
    "train_step": ["train_step.py", "--compile"],
    "attention": ["attention.py"],
    "data_pipeline": ["data_pipeline.py"],
    "probe": ["probe_grid.py"],
    "growth": ["growth.py"],
    "native_packing": ["native_packing.py"],
}
GPU_JOBS = {
    "train_step_gpu": [
        "train_step.py",
        "--device",
        "cuda",
        "--size",
        "large",
        "--batch",
        "64",
        "--dtype",
        "bf16",
        "--rounds",
        "5",
        "--steps",
        "5",
        "--compile",
        "--name",
        "train_step_gpu",
    ],
    "attention_gpu": [
        "attention.py",
        "--device",
        "cuda",
        "--batch",
        "64",
        "--heads",
        "8",
        "--head-dim",
        "128",
        "--dtype",
        "bf16",
    ],
    "growth_gpu": [
        "growth.py",
        "--device",
        "cuda",
        "--size",
        "large",
        "--dtype",
        "bf16",
        "--batches",
        "32",
        "64",
        "128",
        "--res-batch",
        "32",
        "--steps",
        "5",
        "--name",
        "growth_gpu",
    ],
    "scaleout": [
        "scaleout.py",
        "--size",
        "huge",
        "--steps",
        "30",
        "--strategies",
        "deepspeed_zero2",
        "deepspeed_zero3",
    ],
    "native_packing_gpu": [
        "native_packing.py",
        "--device",
        "cuda",
        "--size",
        "large",
        "--dtype",
        "bf16",
        "--time-scale",
        "1",
        "--name",
        "native_packing_gpu",
    ],
}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "**not met**"


def summary() -> Path:
    rows = []
    step = load("train_step")
    if step:
        ours = step["variants"]["aimv2"]
        rows.append(
            [
                "CPU training step: MFU vs measured matmul peak",
                f"{ours['mfu_vs_measured_peak']:.1%} "
                f"({ours['samples_per_s']} samples/s, {ours['tflops'] * 1e3:.0f} GFLOP/s of "
                f"{step['matmul_peak_tflops'] * 1e3:.0f})",
                ">= 65%",
                verdict(ours["mfu_vs_measured_peak"], 0.65, True),
                step["date"],
            ]
        )
        rows.append(
            [
                "CPU training step: time vs stock baseline",
                f"{ours['time_vs_stock']:.3f}x",
                "<= 1.0x",
                verdict(ours["time_vs_stock"], 1.0, False),
                step["date"],
            ]
        )
        compiled = step["variants"].get("aimv2, compiled blocks")
        if compiled:
            rows.append(
                [
                    "CPU training step, compiled blocks: MFU",
                    f"{compiled['mfu_vs_measured_peak']:.1%}",
                    "(torch.compile where it pays)",
                    "recorded",
                    step["date"],
                ]
            )
    attention = load("attention")
    if attention:
        ms = attention["ms_fwd_bwd"]
        ours, boolean = ms["SDPA, additive bias (ours)"], ms["SDPA, boolean mask"]
        rows.append(
            [
                "Prefix-mask attention: additive bias vs boolean mask",
                f"{ours:.1f} vs {boolean:.1f} ms ({ours / ms['SDPA, no mask (lower bound)']:.2f}x the unmasked call)",
                "the fastest path that trains",
                f"FlexAttention: {attention['flex']}",
                attention["date"],
            ]
        )
    data = load("data_pipeline")
    if data:
        rate = data["samples_per_s"]["pipeline"]
        rows.append(
            [
                "Data pipeline, one worker: vs raw decode + crop",
                f"{data['pipeline_vs_raw']:.1%} ({rate} samples/s)",
                ">= 90%",
                verdict(data["pipeline_vs_raw"], 0.90, True),
                data["date"],
            ]
        )
    probe = load("probe")
    if probe:
        for kind, f in probe["heads"].items():
            rows.append(
                [
                    f"Probe: 14 {kind} heads vs 1",
                    f"{f['grid_cost_ratio_14_vs_1']:.2f}x (cached {f['cached_14_heads_samples_per_s']} samples/s)",
                    "<= 1.3x",
                    verdict(f["grid_cost_ratio_14_vs_1"], 1.3, False),
                    probe["date"],
                ]
            )
    growth = load("growth")
    if growth:
        biggest = max((p for p in growth["points"] if "error" not in p), key=lambda p: (p["tokens"], p["batch"]))
        rows.append(
            [
                "Growth (batch, resolution, checkpointing)",
                f"{len(growth['points'])} points, up to {biggest['tokens']} tokens",
                "recorded",
                "recorded",
                growth["date"],
            ]
        )
    native = load("native_packing")
    if native:
        packed = {k: v["padding"] for k, v in native["padding"].items() if k.startswith("packed")}
        worst = max(packed.values())
        rows.append(
            [
                "Native resolution: padding of packed batches",
                f"{worst:.1%} at most ({len(packed)} row "
                f"lengths; padded batches {native['padding']['padded to max_patches']['padding']:.0%})",
                "< 5%",
                verdict(worst, 0.05, False),
                native["date"],
            ]
        )
        ratio = native["ratios"]["packed / fixed"]
        rows.append(
            [
                "Native resolution, CPU: packed / fixed-size real tokens/s",
                f"{ratio:.3f} (packed / padded {native['ratios']['packed / padded']:.3f})",
                ">= 0.95",
                verdict(ratio, 0.95, True),
                native["date"],
            ]
        )
    native_gpu = load("native_packing_gpu")
    if native_gpu and native_gpu.get("device", "").startswith("cuda"):
        ratio = native_gpu["ratios"]["packed flex / fixed"]
        rows.append(
            [
                "H200: native packed (FlexAttention) / fixed-size real tokens/s",
                f"{ratio:.3f}",
                ">= 0.95",
                verdict(ratio, 0.95, True),
                native_gpu["date"],
            ]
        )
    else:
        rows.append(
            [
                "H200: native packed (FlexAttention) / fixed-size real tokens/s",
                "not measured: no GPU was available",
                ">= 0.95",
                "not measured",
                "-",
            ]
        )
    gpu = load("train_step_gpu")
    if gpu and gpu.get("device", "").startswith("cuda"):
        ours = gpu["variants"].get("aimv2, compiled blocks") or gpu["variants"]["aimv2"]
        rows.append(
            [
                "H200: AIMv2-L 224 px bf16 MFU (989 TFLOP/s)",
                f"{ours['mfu_vs_989_tflops']:.1%}",
                ">= 45%",
                verdict(ours["mfu_vs_989_tflops"], 0.45, True),
                gpu["date"],
            ]
        )
    else:
        rows.append(
            [
                "H200: AIMv2-L 224 px bf16 MFU (989 TFLOP/s)",
                "not measured: no GPU was available",
                ">= 45%",
                "not measured",
                "-",
            ]
        )
    scale = load("scaleout")
    if scale and scale.get("rows"):
        rows.append(
            [
                "H200: ViT-H / 1B with ZeRO-2/3, step time and memory",
                "see scaleout.md",
                "recorded",
                "recorded",
                scale["meta"]["date"],
            ]
        )
    else:
        rows.append(
            [
                "H200: ViT-H / 1B with ZeRO-2/3, step time and memory",
                "not measured: no GPU was available",
                "recorded",
                "not measured",
                "-",
            ]
        )
    info = machine("cpu")
    md = [
        "# Benchmark summary",
        "",
        f"Written {info['date']} on {machine_line(info)}. Each figure comes from the "
        "results file beside this one (its own date and machine); `.venv/bin/python benchmarks/run.py` "
        "refreshes them all.",
        "",
    ]
    md += table(["item", "figure", "target", "status", "measured"], rows)
    return write_results("summary", {"rows": rows}, md)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks (needs CUDA)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*CPU_JOBS, *GPU_JOBS, "summary"],
        help="run only these (summary: no benchmark, just the table)",
    )
    args = parser.parse_args(argv)
    jobs = {**CPU_JOBS, **(GPU_JOBS if args.gpu else {})}
    if args.only:
        jobs = {name: cmd for name, cmd in {**CPU_JOBS, **GPU_JOBS}.items() if name in args.only}
    for name, cmd in jobs.items():
        start = time.perf_counter()
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        if done.returncode != 0:
            raise SystemExit(f"benchmark {name} failed (exit {done.returncode}); results of the others are kept")
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    path = summary()
    print(path.read_text())


if __name__ == "__main__":
    main()
