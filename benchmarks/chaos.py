"""Chaos run: one CPU pre-training run (debug size, epoch mode) killed again and again at random
moments, by SIGKILL, SIGTERM or SIGUSR1 sent to every process of the run (as SLURM signals a job
step), and restarted each time with `trainer.resume=auto` on a random number of ranks (1-3) and data
workers (1-2), with data.batch_size = 12 / ranks so that every step trains 12 samples. Then it
checks what survived:

- the final weights are finite;
- each epoch trained every sample at most once, and the samples it missed are exactly the drop-last
  remainder its last plan declared (the plan of the layout that ran it, or of the last resume that
  replanned it: "resuming epoch E under another data layout ... (R samples left over");
- no checkpoint is half-written (each one loads; no temporary is left);
- metrics.csv has every step exactly once: no gap, no duplicate.

    .venv/bin/python benchmarks/chaos.py                     # 8 interruptions, seed 0: ~6 minutes on 2 cores
    .venv/bin/python benchmarks/chaos.py --kills 20 --seed 1

Writes results/chaos.json and results/chaos.md; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from aimv2.data.shardlist import ShardInfo, resolve_shards  # noqa: E402
from aimv2.data.shards import ShardSample, write_shards  # noqa: E402
from aimv2.data.stream import plan_epoch  # noqa: E402
from aimv2.data.tokenizer import write_vocabulary  # noqa: E402
from aimv2.engine.checkpointing import checkpoint_step, newest_intact  # noqa: E402
from aimv2.engine.logs import read_metric  # noqa: E402
from aimv2.engine.stream_resume import read_sample_log  # noqa: E402
from common import machine, machine_line, publish, table  # noqa: E402

STEP_SAMPLES = 12  # samples per step on any number of ranks: batch = 12 / ranks
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1}
GRACE_S = 60  # after SIGTERM / SIGUSR1, the run gets this long to end before the group is SIGKILLed


def write_data(root: Path, rng: np.random.Generator) -> tuple[str, list[ShardInfo]]:
    """16 shards of 9..21 samples (uneven, like real shards), captions "sample i"."""
    counts = [int(c) for c in rng.integers(9, 22, size=16)]
    urls = []
    for s, n in enumerate(counts):

        def samples(s=s, n=n):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(buf, "JPEG")
                yield ShardSample(key=f"s{s:02d}_{i:04d}", image=buf.getvalue(), image_ext="jpg", caption=f"sample {i}")

        report = write_shards(
            samples(), root / f"part{s:02d}", samples_per_shard=100, verify_images=False, progress=False
        )
        urls.append(report.urls)
    spec = "::".join(urls)
    write_vocabulary([f"sample {i}" for i in range(30)], root / "vocab.txt")
    return spec, resolve_shards(spec, "data", need_counts=True)


def command(run: Path, data: Path, spec: str, ranks: int, workers: int, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "aimv2",
        "pretrain",
        str(REPO / "configs/pretrain/debug.yaml"),
        f"run_dir={run}",
        f"data.sources=[{{urls: '{spec}'}}]",
        "data.tokenizer.kind=words",
        f"data.tokenizer.path={data / 'vocab.txt'}",
        "data.tokenizer.max_length=8",
        "model.img_size=28",
        "data.mode=epoch",
        f"data.batch_size={STEP_SAMPLES // ranks}",
        f"data.num_workers={workers}",
        "data.shuffle_buffer=16",
        f"trainer.devices={ranks}",
        "trainer.strategy=ddp",
        "trainer.max_steps=-1",
        f"trainer.max_epochs={epochs}",
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.keep_checkpoints=2",
        "trainer.log_samples=true",
        "trainer.progress_bar=false",
        "visualize.every_n_steps=0",
        "optim.warmup_steps=2",
        "trainer.resume=auto",
    ]


def logged_steps(run: Path, since: float) -> int:
    """The last step rank 0 logged, once this segment has rewritten the log (a resumed run first
    drops the lines past its checkpoint); 0 before."""
    path = run / "logs/samples/rank0.tsv"
    try:
        if path.stat().st_mtime < since:
            return 0
        return max((step for _, _, step, _ in read_sample_log(path)), default=0)
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


def segment(cmd: list[str], run: Path, start: int, kill: tuple[str, float] | None, log: Path) -> dict:
    """Run until it ends, or until `start + 1` steps are logged and then `kill[1]` more seconds pass,
    when every process of the run gets signal `kill[0]`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        sent, forced = None, False
        try:
            while proc.poll() is None:
                if kill is not None and sent is None and logged_steps(run, t0) > start:
                    time.sleep(kill[1])
                    if proc.poll() is None:
                        os.killpg(proc.pid, SIGNALS[kill[0]])
                        sent = time.time()
                if sent is not None and time.time() - sent > GRACE_S and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    forced = True
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            try:  # nothing of the run may outlive it (ranks, data workers)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log.read_text()
    errors = [line for line in output.splitlines() if "Error" in line or "error:" in line]
    return {
        "rc": proc.returncode,
        "signal": kill[0] if kill and sent else None,
        "forced_kill": forced,
        "seconds": round(time.time() - t0, 1),
        "output": output,
        "last_error": errors[-1][:160] if errors and proc.returncode not in (0, -9, -15) else "",
    }


def check(run: Path, shards: list[ShardInfo], segments: list[dict]) -> dict:
    """The run's figures and the list of failed checks."""
    failures = []
    ckpt_dir = run / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    steps = last["global_step"]
    if not all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()):
        failures.append("non-finite weights in last.ckpt")
    for path in ckpt_dir.iterdir():
        if path.name.endswith(".tmp") or path.name.startswith("."):
            failures.append(f"temporary left behind: {path.name}")
        elif path.suffix == ".ckpt":
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001  (any failure to load is the finding)
                failures.append(f"{path.name} does not load: {err}")
    logged = [s for s, _ in read_metric(run / "logs/metrics.csv", "train/loss")]
    if logged != list(range(steps)):
        missing = sorted(set(range(steps)) - set(logged))
        failures.append(
            f"metrics.csv train/loss steps: {len(logged)} rows for {steps} steps, missing {missing[:10]}, "
            f"duplicated {[s for s, n in Counter(logged).items() if n > 1][:10]}"
        )
    repeated = read_metric(run / "logs/metrics.csv", "data/repeated_samples")
    if repeated and repeated[-1][1] != 0:
        failures.append(f"data/repeated_samples = {repeated[-1][1]}")

    rows = [row for path in sorted((run / "logs/samples").glob("rank*.tsv")) for row in read_sample_log(path)]
    per_step = Counter()
    for _, _, step, keys in rows:
        per_step[step] += len(keys)
    if sorted(per_step) != list(range(1, steps + 1)) or set(per_step.values()) != {STEP_SAMPLES}:
        failures.append("the sample logs do not hold every step once with 12 samples")
    total = sum(s.count for s in shards)
    epochs = []
    for epoch in sorted({e for e, _, _, _ in rows}):
        seen = Counter(k for e, _, _, keys in rows if e == epoch for k in keys)
        first = min(step for e, _, step, _ in rows if e == epoch)
        replans = [
            int(m)
            for seg in segments
            for m in re.findall(
                rf"resuming epoch {epoch} under another data layout .*?\((\d+) samples left over", seg["output"]
            )
        ]
        if replans:
            declared, by = replans[-1], "last resume's replan"
        else:  # planned by the layout of the segment that ran the epoch's first step
            seg = max((s for s in segments if s["start"] < first), key=lambda s: s["index"])
            slots = seg["ranks"] * seg["workers"]
            plan = plan_epoch(np.array([s.count for s in shards]), slots, STEP_SAMPLES // seg["ranks"])
            declared, by = total - plan.batches_per_slot * slots * (STEP_SAMPLES // seg["ranks"]), "its plan"
        dupes = sum(n - 1 for n in seen.values())
        missed = total - len(seen)
        epochs.append(
            {
                "epoch": epoch,
                "trained": sum(seen.values()),
                "distinct": len(seen),
                "repeated": dupes,
                "missed": missed,
                "declared_remainder": declared,
                "declared_by": by,
            }
        )
        if dupes or missed != declared:
            failures.append(f"epoch {epoch}: {dupes} repeated, {missed} missed, {declared} declared ({by})")
    return {"steps": steps, "epochs": epochs, "failures": failures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8, help="interruptions before the run may finish")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=4.0, help="seconds after the segment's first step")
    parser.add_argument("--name", default="chaos")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="aimv2-chaos-"))
    spec, shards = write_data(work / "data", np.random.default_rng(args.seed))
    run = work / "run"
    segments, t0 = [], time.time()
    signals = (sorted(SIGNALS) * args.kills)[: args.kills]  # every kind of interruption, in a seeded order
    rng.shuffle(signals)
    for i in range(args.kills + 1):
        ranks, workers = rng.randint(1, 3), rng.randint(1, 2)
        intact = newest_intact(run / "checkpoints") if (run / "checkpoints").is_dir() else None
        start = checkpoint_step(intact) if intact is not None else 0
        kill = (signals[i], round(rng.uniform(0, args.max_delay), 2)) if i < args.kills else None
        cmd = command(run, work / "data", spec, ranks, workers, args.epochs)
        seg = segment(cmd, run, start, kill, work / f"segment{i}.log")
        seg.update(index=i, ranks=ranks, workers=workers, start=start)
        segments.append(seg)
        print(
            f"segment {i}: {ranks} rank(s) x {workers} worker(s) from step {start}: "
            f"{seg['signal'] or 'ran to the end'} after {seg['seconds']} s (rc {seg['rc']})",
            flush=True,
        )
        if kill is None and seg["rc"] != 0:
            print(seg["output"][-3000:])
            return 1
    result = check(run, shards, segments)
    survived = Counter(s["signal"] for s in segments if s["signal"])
    data = {
        "machine": machine(),
        "seed": args.seed,
        "kills": args.kills,
        "epochs": args.epochs,
        "samples": sum(s.count for s in shards),
        "shards": len(shards),
        "steps": result["steps"],
        "seconds": round(time.time() - t0),
        "signals": dict(survived),
        "segments": [
            {
                k: s[k]
                for k in ("index", "ranks", "workers", "start", "signal", "forced_kill", "rc", "seconds", "last_error")
            }
            for s in segments
        ],
        "epoch_table": result["epochs"],
        "failures": result["failures"],
    }
    md = [
        f"# Chaos run ({args.kills} interruptions, seed {args.seed})",
        "",
        machine_line(data["machine"]),
        "",
        f"`benchmarks/chaos.py --kills {args.kills} --epochs {args.epochs} --max-delay {args.max_delay:g} "
        f"--seed {args.seed}`: {data['samples']} samples in "
        f"{data['shards']} shards, {args.epochs} epochs, 12 samples per step on 1-3 ranks; "
        f"{data['steps']} steps in {data['seconds']} s. Interruptions survived: "
        + ", ".join(f"{n} x {sig}" for sig, n in sorted(survived.items()))
        + ".",
        "",
        *table(
            ["segment", "ranks x workers", "from step", "ended by", "rc", "s", "last error (rc not 0/-9/-15)"],
            [
                [
                    s["index"],
                    f"{s['ranks']} x {s['workers']}",
                    s["start"],
                    (s["signal"] or "end of run") + (" (then SIGKILL)" if s["forced_kill"] else ""),
                    s["rc"],
                    s["seconds"],
                    s["last_error"].replace("|", "/"),
                ]
                for s in segments
            ],
        ),
        "",
        *table(
            ["epoch", "samples trained", "distinct", "repeated", "missed", "declared remainder", "declared by"],
            [
                [
                    e["epoch"],
                    e["trained"],
                    e["distinct"],
                    e["repeated"],
                    e["missed"],
                    e["declared_remainder"],
                    e["declared_by"],
                ]
                for e in result["epochs"]
            ],
        ),
        "",
        "Checks: finite weights, every checkpoint loads and no temporary is left, metrics.csv holds every step "
        "once, every epoch exact (no repeat; missed = the declared remainder): "
        + ("**all passed**." if not result["failures"] else "**FAILED**: " + "; ".join(result["failures"])),
    ]
    publish(args.name, data, md)
    if not result["failures"]:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept for inspection: {work}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
