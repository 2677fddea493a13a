"""Checkpoint-and-requeue on a real SLURM cluster (slurm_cluster.py: Debian's packages, one node of
2 CPUs on localhost), through the project's own sbatch template, exactly as docs/scale-out.md's
guide submits it: 2 tasks of CPU DDP (gloo) pre-train the debug size; mid-run the test sends the
preemption signal (`scancel --signal=USR1`, what `#SBATCH --signal=SIGUSR1@90` sends before the
time limit); the job checkpoints at a step boundary, requeues itself and, started again by SLURM,
continues from that checkpoint to the planned step count, every sample of each epoch seen once."""

import pytest

from slurm_cluster import SlurmCluster, ensure_slurm_installed
from slurm_jobs import assert_resumed_exactly, preempt_and_finish, submit

pytestmark = pytest.mark.slow  # a SLURM cluster and a requeued 2-rank DDP job: about 100 s


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


def test_preempted_job_checkpoints_requeues_and_resumes(cluster):
    job, run_dir, job_log = submit(cluster, "slurm_1node.sbatch", ["--ntasks-per-node=2"])
    final = preempt_and_finish(cluster, job, run_dir, job_log)
    out = job_log.read_text()
    assert "restart 0 on" in out and "restart 1 on" in out  # the template's line, once per start
    assert_resumed_exactly(final, run_dir, out)
