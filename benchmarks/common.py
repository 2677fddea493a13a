"""Shared pieces of the benchmarks: the machine's description, its matmul peak measured in the same
run, alternating timing (so load drift hits every variant alike), and the results files
(benchmarks/results/NAME.json + NAME.md, written atomically)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aimv2.fileio import atomic_write, markdown_table

RESULTS = Path(os.environ.get("AIMV2_BENCHMARK_RESULTS", Path(__file__).resolve().parent / "results"))
H200_BF16_PEAK = 989e12  # dense bf16: NVIDIA's H200 datasheet gives 1,979 TFLOP/s with 2:4 sparsity, half dense


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "host_cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info['host_cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads)"
    return f"{where}; torch {info['torch']}; Python {info['python']}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_peak(
    device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None, trials: int = 5
) -> float:
    """Best achieved FLOP/s of an n^3 matmul into a preallocated output (1536 on the CPU, the size the
    project's calibration uses; 8192 on a GPU). The best of several trials: the machine's limit."""
    n = n or (8192 if device.startswith("cuda") else 1536)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    reps = 20 if device.startswith("cuda") else 4
    torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(trials):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def alternate(
    fns: dict[str, Callable[[], None]], rounds: int, steps: int, device: str = "cpu", warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternation: round r times `steps` calls of every
    function in turn. Returns the per-round means; compare medians."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(name: str, data: dict, markdown: list[str]) -> Path:
    """benchmarks/results/NAME.json and NAME.md; returns the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS / f"{name}.json", json.dumps(data, indent=1) + "\n")
    path = RESULTS / f"{name}.md"
    atomic_write(path, "\n".join(markdown) + "\n")
    return path


def publish(name: str, data: dict, markdown: list[str]) -> Path:
    """Write the results files and print the Markdown, as every benchmark ends."""
    path = write_results(name, data, markdown)
    print("\n".join(markdown))
    print(f"\nwritten: {path}")
    return path


def table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table (aimv2.fileio.markdown_table), to extend a benchmark's Markdown lines."""
    return markdown_table(header, rows).split("\n")
