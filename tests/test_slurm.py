"""Checkpoint-and-requeue on a real SLURM cluster (slurm_cluster.py: Debian's packages, one node of
2 CPUs on localhost), through the project's own sbatch template, exactly as the README's guide
submits it: 2 tasks of CPU DDP (gloo) pre-train the debug size; mid-run the test sends the
preemption signal (`scancel --signal=USR1`, what `#SBATCH --signal=SIGUSR1@90` sends before the
time limit); the job checkpoints at a step boundary, requeues itself and, started again by SLURM,
continues from that checkpoint to the planned step count, every sample of each epoch seen once."""

import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

from aimv2.engine.metrics import read_metric
from aimv2.engine.stream_state import read_sample_log
from conftest import REPO, write_caption_shards
from fault_helpers import tiny_tokenizer
from slurm_cluster import SlurmCluster, ensure_slurm_installed, wait_for

BATCH, EPOCHS, N = 4, 2, 64  # 64 samples over 2 ranks = 8 batches of 4 per rank and epoch: 16 steps
STEPS = N // 2 // BATCH * EPOCHS


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_slurm_installed()
    if reason is not None:
        pytest.skip(reason)
    cluster = SlurmCluster(cpus=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path):
    work = cluster.root / "job"  # beside the cluster state: readable by the job, removed with it
    report = write_caption_shards(work / "shards", N, 16)
    run_dir, job_log = work / "run", work / "job.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
         f"--output={job_log}", f"--chdir={REPO}", "--time=15",
         f"--export=ALL,CONFIG={REPO / 'configs/pretrain/debug.yaml'},PYTHON={sys.executable},"
         "PYTHONWARNINGS=ignore,OMP_NUM_THREADS=1",
         str(REPO / "launch/slurm_1node.sbatch"), *tiny_tokenizer(work / "tokenizer"),
         f"run_dir={run_dir}", f"data.sources=[{{urls: '{report.urls}'}}]", "model.img_size=28",
         "data.mode=epoch", f"data.batch_size={BATCH}", "data.num_workers=0", "data.shuffle_buffer=8",
         "data.tokenizer.max_length=8", "trainer.strategy=ddp", "trainer.max_steps=-1",
         f"trainer.max_epochs={EPOCHS}", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=5",
         "trainer.log_samples=true", "trainer.progress_bar=false", "visualize.every_n_steps=0",
         "optim.warmup_steps=2"],
        env=cluster.env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip()
    samples = run_dir / "logs/samples/rank0.tsv"

    # Preempt once training is under way (3 steps done on rank 0).
    wait_for(lambda: samples.exists() and len(read_sample_log(samples)) >= 3, "3 training steps", 240, job_log)
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0
    info = wait_for(lambda: (lambda j: j if j.get("Restarts") == "1" and j.get("JobState") == "PENDING" else None)(
        cluster.job(job)), "the job to be requeued", 120, job_log)
    # SLURM holds a requeued job for ~2 minutes (EligibleTime = requeue + 121 s, measured on 22.05);
    # release it now. Nothing about the run changes: the new job starts the same script.
    assert info.get("Reason") == "BeginTime", info
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=True)
    final = wait_for(lambda: (lambda j: j if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") else None)(
        cluster.job(job)), "the requeued job to finish", 300, job_log)

    out = job_log.read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", out[-3000:]
    assert "restart 0 on" in out and "restart 1 on" in out  # the template's line, once per start
    stop_line = next(line for line in out.splitlines() if line.startswith("stopped by a signal at step"))
    stopped = int(stop_line.split("at step ")[1].split(":")[0])
    assert 3 <= stopped < STEPS and "requeued" in stop_line
    resumed = re.search(rf"resuming from {re.escape(str(run_dir / 'checkpoints'))}/(last|step=(\d+))\.ckpt", out)
    assert resumed and resumed.group(2) in (None, f"{stopped:07d}"), out[-3000:]
    assert f"pre-training finished after {STEPS} steps" in out
    assert torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == STEPS
    assert [s for s, _ in read_metric(run_dir / "logs/metrics.csv", "train/loss")] == list(range(STEPS))
    # Every step once per rank, and per epoch every sample once over both ranks: the preemption lost
    # and repeated nothing.
    logs = [read_sample_log(run_dir / f"logs/samples/rank{r}.tsv") for r in (0, 1)]
    for rows in logs:
        assert [step for _, _, step, _ in rows] == list(range(1, STEPS + 1))
    for epoch in range(EPOCHS):
        seen = Counter(k for rows in logs for e, _, _, keys in rows if e == epoch for k in keys)
        assert len(seen) == N and max(seen.values()) == 1, f"epoch {epoch}: {sorted(seen.items())[:5]}"
