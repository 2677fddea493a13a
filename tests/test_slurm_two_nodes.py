"""Checkpoint-and-requeue across two SLURM nodes for real: slurm_cluster.py starts slurmctld and two
slurmd daemons, each in a network namespace of its own (own IP on a private bridge, 1 CPU), and the
test submits the project's many-node template, launch/slurm_multinode.sbatch, with one rank per
node: CPU DDP (gloo) whose rank 1 reaches rank 0 (MASTER_ADDR = the first node's name, resolved by
Lightning's SLURM environment) across the namespaces. Mid-run the test sends the preemption signal
(`scancel --signal=USR1`); the job checkpoints, requeues itself and, started again on both nodes,
finishes with every step logged once per rank and every sample once per epoch over the two ranks."""

import re

import pytest

from netns_hosts import IFNAME, NetnsError
from slurm_cluster import SlurmCluster
from slurm_jobs import assert_resumed_exactly, preempt_and_finish, submit


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
    job, run_dir, job_log = submit(
        cluster, "slurm_multinode.sbatch", ["--nodes=2", "--ntasks-per-node=1"], env=f",GLOO_SOCKET_IFNAME={IFNAME}"
    )
    final = preempt_and_finish(cluster, job, run_dir, job_log)
    out = job_log.read_text()
    # Both starts ran on both nodes: the template's line names the allocation, and each node's
    # slurmd launched the training step (step 0) once per start, at the request of srun on the
    # batch node, aimv2n0, whose address is its namespace's.
    assert final["NumNodes"] == "2" and final["NodeList"] == "aimv2n[0-1]", final
    assert "restart 0 on aimv2n[0-1]" in out and "restart 1 on aimv2n[0-1]" in out, out[-3000:]
    for node in cluster.nodes:
        launches = re.findall(
            rf"launch task StepId={job}\.0 request from .* HOST:([\d.]+) ", cluster.slurmd_log(node).read_text()
        )
        assert launches == [cluster.hosts.addrs[0]] * 2, (node, launches)
    assert_resumed_exactly(final, run_dir, out)
