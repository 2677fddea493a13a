"""The benchmark scripts run end to end at toy sizes and write complete results (figures are not
asserted: speed is measured by running benchmarks/run.py on a quiet machine, never in tests)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"


def run(script: str, *args: str, results) -> None:
    env = {**os.environ, "AIMV2_BENCHMARK_RESULTS": str(results)}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_every_cpu_benchmark_writes_its_results_and_the_summary_reads_them(tmp_path):
    run(
        "train_step.py",
        "--size",
        "debug",
        "--img-size",
        "56",
        "--batch",
        "2",
        "--vocab",
        "100",
        "--text-len",
        "8",
        "--rounds",
        "1",
        "--steps",
        "1",
        results=tmp_path,
    )
    run(
        "attention.py",
        "--batch",
        "2",
        "--heads",
        "2",
        "--tokens",
        "16",
        "--head-dim",
        "8",
        "--rounds",
        "1",
        "--steps",
        "1",
        results=tmp_path,
    )
    run("data_pipeline.py", "--samples", "32", "--batch", "16", "--img-size", "56", "--rounds", "1", results=tmp_path)
    run(
        "probe_grid.py",
        "--size",
        "debug",
        "--img-size",
        "56",
        "--batch",
        "4",
        "--classes",
        "10",
        "--repeats",
        "1",
        results=tmp_path,
    )
    run(
        "growth.py",
        "--size",
        "debug",
        "--batches",
        "2",
        "--batch-px",
        "56",
        "--resolutions",
        "56",
        "--res-batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--vocab",
        "100",
        "--text-len",
        "8",
        results=tmp_path,
    )
    run(
        "native_packing.py",
        "--size",
        "debug",
        "--samples",
        "300",
        "--time-scale",
        "0.25",
        "--rows",
        "2",
        "--window",
        "64",
        "--batches",
        "1",
        "--rounds",
        "1",
        "--vocab",
        "100",
        "--text-len",
        "40",
        results=tmp_path,
    )
    run("run.py", "--only", "summary", results=tmp_path)

    step = json.loads((tmp_path / "train_step.json").read_text())
    assert set(step["variants"]) == {"aimv2", "stock baseline"}
    ours = step["variants"]["aimv2"]
    # The figures hang together: MFU = achieved FLOP/s over the peak measured in the same run.
    assert abs(ours["tflops"] / step["matmul_peak_tflops"] - ours["mfu_vs_measured_peak"]) < 0.01
    assert step["variants"]["stock baseline"]["time_vs_stock"] == 1.0
    data = json.loads((tmp_path / "data_pipeline.json").read_text())
    assert data["samples"] == 32 and set(data["stage_ms_per_sample"]) >= {"decode", "crop", "tar reading (webdataset)"}
    attention = json.loads((tmp_path / "attention.json").read_text())
    assert "SDPA, additive bias (ours)" in attention["ms_fwd_bwd"]
    growth = json.loads((tmp_path / "growth.json").read_text())
    assert [(p["batch"], p["img_size"], p["activation_checkpointing"]) for p in growth["points"]] == [
        (2, 56, False),
        (2, 56, True),
    ]
    assert all(p["peak_gib"] > 0 for p in growth["points"])
    native = json.loads((tmp_path / "native_packing.json").read_text())
    names = list(native["variants"])  # the fixed side holds max_patches = 64 tokens at this scale: 8 x 14 px
    assert names[:2] == ["packed, dense SDPA", "padded, dense SDPA"] and names[2].startswith("fixed 112 px, batch ")
    assert all(v["real_tokens_per_s"] > 0 and "peak_gib" in v for v in native["variants"].values())
    assert set(native["ratios"]) == {"packed / fixed", "packed / padded"}
    summary = (tmp_path / "summary.md").read_text()
    for item in (
        "MFU vs measured matmul peak",
        "time vs stock baseline",
        "Data pipeline",
        "Probe: 14 attentive",
        "Growth",
        "Native resolution: padding of packed batches",
        "H200: AIMv2-L 224 px bf16 MFU (989 TFLOP/s) | not measured",
    ):
        assert item in summary, item
    for name in ("train_step", "data_pipeline", "probe", "growth", "attention", "native_packing"):
        assert (tmp_path / f"{name}.md").read_text().startswith("# ")


def test_the_prepared_gpu_check_is_ready_to_run():
    """benchmarks/gpu_check.sh runs only where CUDA is; here: its shell parses, its steps' time limits fit
    the 10 minutes one device command may take, and the scale-out script it calls accepts its arguments."""
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    limits = [int(n) for n in __import__("re").findall(r"timeout (\d+) ", text)]
    assert len(limits) == 3 and sum(limits) <= 600
    assert "--strategies ddp fsdp deepspeed_zero2 deepspeed_zero3" in text
    done = subprocess.run([sys.executable, str(BENCH / "scaleout.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--config" in done.stdout
