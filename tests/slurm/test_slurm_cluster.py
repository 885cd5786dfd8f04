"""The local Slurm cluster behaves like the target site: GPU gres, partitions, accounting."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurmCluster

pytestmark = pytest.mark.slurm

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def test_client_env_reaches_controller(slurm_cluster: LocalSlurmCluster) -> None:
    # The fixture exports SLURM_CONF, so plain subprocesses (snakemake!) reach the cluster.
    assert os.environ["SLURM_CONF"] == slurm_cluster.env["SLURM_CONF"]
    t0 = time.monotonic()
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    assert time.monotonic() - t0 < 5
    assert f"ClusterName             = {slurm_cluster.cluster_name}" in out
    partitions = subprocess.run(
        ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    assert partitions == [
        f"{slurm_cluster.cpu_partition}*",
        slurm_cluster.gpu_partition,
        slurm_cluster.multi_partition,
    ]


def test_gpu_job_gets_gres_and_tres(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "gpu.out"
    job = slurm_cluster.sbatch(
        "-p", slurm_cluster.gpu_partition, "--gres=gpu:v100d32q:1", "-A", slurm_cluster.account,
        "-o", str(out), "--wrap", 'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"',
    )  # fmt: skip
    assert slurm_cluster.wait_for_state(job, DONE) == "COMPLETED"
    assert "CUDA_VISIBLE_DEVICES=0" in out.read_text()

    res = slurm_cluster.job_resources(job)
    assert res.gpus == 1
    assert res.alloc_tres["gres/gpu:v100d32q"] == "1"
    assert res.req_tres["gres/gpu"] == "1"
    assert res.gres == "gres:gpu:v100d32q:1"
    assert "gres/gpu=1" in res.scontrol["TRES"]
    assert res.scontrol["Partition"] == slurm_cluster.gpu_partition
    assert res.scontrol["Account"] == slurm_cluster.account


def test_cpu_job_has_no_gpu_tres(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "cpu.out"
    # No -p / -A: the defaults are the `cpu` partition and the project account.
    job = slurm_cluster.sbatch(
        "-c", "2", "--mem=500M", "-o", str(out), "--wrap", 'echo "GPUS=[$CUDA_VISIBLE_DEVICES]"'
    )
    assert slurm_cluster.wait_for_state(job, DONE) == "COMPLETED"
    assert "GPUS=[]" in out.read_text()

    res = slurm_cluster.job_resources(job)
    assert res.gpus == 0
    assert not [k for k in res.alloc_tres if k.startswith("gres/")]
    assert res.alloc_tres["cpu"] == "2"
    assert res.alloc_tres["mem"] == "500M"
    assert res.scontrol["Partition"] == slurm_cluster.cpu_partition
    assert res.scontrol["Account"] == slurm_cluster.account


def test_scancel_shows_cancelled(slurm_cluster: LocalSlurmCluster) -> None:
    job = slurm_cluster.sbatch("-o", "/dev/null", "--wrap", "sleep 300")
    slurm_cluster.wait_for_state(job, ("RUNNING",), timeout=15, via="scontrol")
    slurm_cluster.run("scancel", job)
    assert slurm_cluster.wait_for_state(job, DONE, timeout=15) == "CANCELLED"


def test_two_task_srun_step(slurm_cluster: LocalSlurmCluster) -> None:
    proc = slurm_cluster.run(
        "srun", "-n", "2", "-t", "1", "--label", "bash", "-c", 'echo "rank=$SLURM_PROCID"',
        timeout=30,
    )  # fmt: skip
    assert sorted(proc.stdout.split()) == ["0:", "1:", "rank=0", "rank=1"]


def test_unknown_account_is_rejected(slurm_cluster: LocalSlurmCluster) -> None:
    proc = slurm_cluster.run(
        "sbatch", "-A", "no-such-account", "--wrap", "true", "-o", "/dev/null", check=False
    )
    assert proc.returncode != 0
    assert "Invalid account" in proc.stderr
