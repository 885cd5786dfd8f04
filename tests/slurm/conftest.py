"""The local Slurm cluster (tools/slurm/slurm_cluster.py), started for the tests in this folder.

Only tests here ask for it, so a session without them starts no service. Once started it stays
up until the session ends, with SLURM_CONF exported: every subprocess (snakemake, sbatch, the jobs
themselves) reaches this cluster, and snakemake's start-up scontrol probe answers at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from slurm_cluster import LocalSlurmCluster
from slurm_configs import SYSTEM_CONF_DIR
from slurm_setup import remove_stale_test_config, unavailable_reason


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurmCluster]:
    """The session's cluster, started once; skips (with the reason) where none can run here
    (not root, packages not installable, LLMPIPE_SLURM=0).

    LLMPIPE_REQUIRE_SLURM=1 (CI, which must exercise Slurm) turns that skip into a failure. A
    cluster that fails to start on a machine that can run one is an error, not a skip.
    """
    if reason := unavailable_reason():
        if os.environ.get("LLMPIPE_REQUIRE_SLURM") == "1":
            pytest.fail(f"LLMPIPE_REQUIRE_SLURM=1 but: {reason}", pytrace=False)
        pytest.skip(reason)
    # Jobs that call srun inside their allocation (Snakemake's jobstep executor does) find the
    # config where a real site keeps it: slurmd does not hand a private SLURM_CONF to the job.
    # So use /etc/slurm unless someone else's config is there: another session's cluster (a
    # parallel pytest, the dev cluster) may own it; then this cluster keeps its config private
    # and the tests that need srun in a job skip.
    remove_stale_test_config()  # left by a killed session
    ours = not (SYSTEM_CONF_DIR / "slurm.conf").exists()
    cluster = LocalSlurmCluster(
        tmp_path_factory.mktemp("slurm"), conf_dir=SYSTEM_CONF_DIR if ours else None
    )
    with pytest.MonkeyPatch.context() as mp:
        try:
            cluster.start()
            for key, value in cluster.env.items():
                mp.setenv(key, value)
            yield cluster
        finally:
            cluster.stop()
            if ours:
                cluster.remove_configs()  # else every later snakemake waits on scontrol


@pytest.fixture
def cluster(slurm_cluster: LocalSlurmCluster) -> LocalSlurmCluster:
    """The session's cluster, provided jobs can reach it with srun (its config in /etc/slurm:
    see slurm_cluster above); skips, or on CI fails, where another cluster owns that config."""
    if not slurm_cluster.jobs_see_config:
        msg = "another local Slurm cluster owns /etc/slurm/slurm.conf: jobs cannot reach ours"
        if os.environ.get("LLMPIPE_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return slurm_cluster
