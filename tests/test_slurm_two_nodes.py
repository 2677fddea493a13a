"""Checkpoint-and-requeue across two SLURM nodes for real: slurm_cluster.py starts slurmctld and two
slurmd daemons, each in a network namespace of its own (own IP on a private bridge, 1 CPU), and the
test submits the project's many-node template, launch/slurm_multinode.sbatch, with one rank per
node: CPU DDP (gloo) whose rank 1 reaches rank 0 (MASTER_ADDR = the first node's name, resolved by
Lightning's SLURM environment) across the namespaces. Mid-run the test sends the preemption signal
(`scancel --signal=USR1`); the job checkpoints, requeues itself and, started again on both nodes,
finishes with every step logged once per rank and every sample once per epoch over the two ranks."""

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
from netns_hosts import IFNAME, NetnsError
from slurm_cluster import SlurmCluster, wait_for

BATCH, EPOCHS, N = 4, 2, 64  # 64 samples over 2 ranks = 8 batches of 4 per rank and epoch: 16 steps
STEPS = N // 2 // BATCH * EPOCHS
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


@pytest.fixture(scope="module")
def cluster():
    reason = SlurmCluster.unavailable(nodes=2)
    if reason is not None:
        pytest.skip(reason)
    try:
        cluster = SlurmCluster(cpus=1, nodes=2).start()  # stops what it started if it fails to start
    except NetnsError as e:  # e.g. root in a container without CAP_NET_ADMIN
        pytest.skip(f"cannot make network namespaces for the nodes here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()  # daemons by pid, then the namespaces and links by their ids, then the temp dir


@pytest.mark.slow
def test_two_node_job_preempted_requeues_and_resumes(cluster):
    work = cluster.root / "job"
    report = write_caption_shards(work / "shards", N, 16)
    run_dir, job_log = work / "run", work / "job.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
         f"--output={job_log}", f"--chdir={REPO}", "--time=15",
         f"--export=ALL,CONFIG={REPO / 'configs/pretrain/debug.yaml'},PYTHON={sys.executable},"
         f"PYTHONWARNINGS=ignore,OMP_NUM_THREADS=1,GLOO_SOCKET_IFNAME={IFNAME}",
         str(REPO / "launch/slurm_multinode.sbatch"), *tiny_tokenizer(work / "tokenizer"),
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

    wait_for(lambda: samples.exists() and len(read_sample_log(samples)) >= 3, "3 training steps", 240, job_log)
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0
    info = wait_for(lambda: (lambda j: j if j.get("Restarts") == "1" and j.get("JobState") == "PENDING" else None)(
        cluster.job(job)), "the job to be requeued", 120, job_log)
    assert info.get("Reason") == "BeginTime", info  # SLURM holds a requeued job ~2 min: release it now
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=True)
    final = wait_for(lambda: (lambda j: j if j.get("JobState") in FINAL else None)(cluster.job(job)),
                     "the requeued job to finish", 300, job_log)

    out = job_log.read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", out[-3000:]
    # Both starts ran on both nodes: the template's line names the allocation, and each node's
    # slurmd launched the training step (step 0) once per start, at the request of srun on the
    # batch node, aimv2n0, whose address is its namespace's.
    assert final["NumNodes"] == "2" and final["NodeList"] == "aimv2n[0-1]", final
    assert "restart 0 on aimv2n[0-1]" in out and "restart 1 on aimv2n[0-1]" in out, out[-3000:]
    for node in cluster.nodes:
        launches = re.findall(rf"launch task StepId={job}\.0 request from .* HOST:([\d.]+) ",
                              cluster.slurmd_log(node).read_text())
        assert launches == [cluster.hosts.addrs[0]] * 2, (node, launches)
    stop_line = next(line for line in out.splitlines() if line.startswith("stopped by a signal at step"))
    stopped = int(stop_line.split("at step ")[1].split(":")[0])
    assert 3 <= stopped < STEPS and "requeued" in stop_line
    resumed = re.search(rf"resuming from {re.escape(str(run_dir / 'checkpoints'))}/(last|step=(\d+))\.ckpt", out)
    assert resumed and resumed.group(2) in (None, f"{stopped:07d}"), out[-3000:]
    assert f"pre-training finished after {STEPS} steps" in out
    assert torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == STEPS
    assert [s for s, _ in read_metric(run_dir / "logs/metrics.csv", "train/loss")] == list(range(STEPS))
    # Every step once per rank, and per epoch every sample once over the two nodes' ranks: the
    # preemption lost and repeated nothing.
    logs = [read_sample_log(run_dir / f"logs/samples/rank{r}.tsv") for r in (0, 1)]
    for rows in logs:
        assert [step for _, _, step, _ in rows] == list(range(1, STEPS + 1))
    for epoch in range(EPOCHS):
        seen = Counter(k for rows in logs for e, _, _, keys in rows if e == epoch for k in keys)
        assert len(seen) == N and max(seen.values()) == 1, f"epoch {epoch}: {sorted(seen.items())[:5]}"
