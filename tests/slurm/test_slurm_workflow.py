"""The workflow through `--profile profiles/slurm` on the real local Slurm cluster.

Asserts from Slurm's own records (sacct / scontrol), never from our own strings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, copy_run, make_tiny_hf, planned_jobs, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]
GGUF_TARGETS = [f"results/gguf/smollm2/smollm2-{v}.json" for v in ("F16", "Q8_0", "Q4_K_M")]


def profile_args(cluster) -> list[str]:
    """The real profile, with the test cluster's account and fast polling (the site's values in
    profiles/slurm/config.yaml are for production)."""
    return [
        "--profile",
        str(REPO / "profiles" / "slurm"),
        "--default-resources",
        f"slurm_account={cluster.account}",
        f"slurm_partition={cluster.cpu_partition}",
        "mem_mb=1000",
        "runtime=30",
        "cpus_per_task=1",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--seconds-between-status-checks",
        "1",
        "--latency-wait",
        "5",
        "--slurm-keep-successful-logs",  # the job ids are read from these logs' names
    ]


def slurm_job_ids(workdir: Path) -> dict[str, list[str]]:
    """rule (or group) -> Slurm job ids, from the plugin's per-job log files."""
    jobs: dict[str, list[str]] = {}
    for log in (workdir / ".snakemake" / "slurm_logs").rglob("*.log"):
        rule = next(p for p in log.relative_to(workdir / ".snakemake" / "slurm_logs").parts)
        jobs.setdefault(re.sub(r"^(rule|group)_", "", rule), []).append(log.stem)
    return jobs


def set_stage_root(workdir: Path, root: str) -> None:
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["stage"]["root"] = root
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_model_chain_on_slurm_matches_the_local_run(default_run, cluster, tmp_path):
    workdir = copy_run(default_run, tmp_path / "w")
    # A private RAM disk per Slurm job, as with job_container/tmpfs.
    set_stage_root(workdir, str(workdir / "shm" / "%j"))
    snakemake(
        workdir,
        *profile_args(cluster),
        "--forcerun=cache_to_shm",  # "=": the option takes a list, not the targets
        *GGUF_TARGETS,
        env=cluster.env,
    )
    for target in GGUF_TARGETS:
        ours = json.loads((workdir / target).read_text())
        local = json.loads((default_run / target).read_text())
        assert ours["sha256"] == local["sha256"], target
        assert ours["provenance"]["slurm"]["slurm_job_id"]
    jobs = slurm_job_ids(workdir)
    # cache_to_shm and convert_to_gguf ran as one grouped Slurm job ("group_model_io_…").
    assert any(name.startswith("model_io") for name in jobs), jobs
    assert len(jobs.get("quantize", [])) == 2, jobs
    for rule, ids in jobs.items():
        for job_id in ids:
            record = cluster.job_resources(job_id)
            assert record.gpus == 0 and "gpu" not in record.gres, (rule, record)
            assert record.scontrol.get("Partition", "cpu") == "cpu"
    # Staging and conversion shared one allocation: the converter found the copy on its node.
    convert = json.loads((workdir / GGUF_TARGETS[0]).read_text())
    staged = json.loads((workdir / "results/staged/smollm2/stage.json").read_text())
    assert convert["staged_input"]["hit"] and convert["staged_input"]["job"] == staged["job"]
    assert planned_jobs(workdir, *GGUF_TARGETS) == {}


def test_failed_job_is_reported_and_rerun_redoes_nothing_finished(default_run, cluster, tmp_path):
    workdir = copy_run(default_run, tmp_path / "w")
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    # A random tiny model whose tokenizer the converter does not know: its conversion fails.
    config["models"]["tiny"] = {"source": "dir", "path": str(make_tiny_hf(tmp_path / "tiny"))}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    target = "results/gguf/tiny/tiny-F16.json"
    done = snakemake(workdir, *profile_args(cluster), target, check=False, env=cluster.env)
    assert done.returncode != 0
    assert "Error in group model_io" in done.stdout + done.stderr or "Error in rule" in (
        done.stdout + done.stderr
    )
    assert (workdir / "results/models/tiny/manifest.json").is_file()  # finished work stays
    assert not (workdir / target).exists()
    # The rerun (tiny removed) has nothing to redo for the finished model.
    del config["models"]["tiny"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_jobs(workdir, *GGUF_TARGETS) == {}


def test_scancel_is_reported_and_a_rerun_completes(default_run, cluster, tmp_path):
    workdir = copy_run(default_run, tmp_path / "w")
    proc = subprocess.Popen(
        [
            str(BIN / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(workdir),
            *profile_args(cluster),
            "--forcerun=quantize",  # "=": the option takes a list, not the targets
            *GGUF_TARGETS[1:],
            # The profile retries a failed job once (as after an OOM kill); off here to see
            # the cancellation reported and the run stop.
            "--retries",
            "0",
        ],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster.client_env({**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}),
    )
    job_id = None
    deadline = time.monotonic() + 120
    while job_id is None and time.monotonic() < deadline:
        out = cluster.run("squeue", "-h", "-o", "%i %j", check=False).stdout.split()
        job_id = out[0] if out else None
        time.sleep(0.2)
    assert job_id, "no Slurm job appeared"
    cluster.run("scancel", job_id)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in output
    snakemake(workdir, "--unlock")
    snakemake(workdir, *profile_args(cluster), *GGUF_TARGETS[1:], env=cluster.env)
    for target in GGUF_TARGETS[1:]:
        ours = json.loads((workdir / target).read_text())
        assert ours["sha256"] == json.loads((default_run / target).read_text())["sha256"]


def test_gpu_rule_asks_for_the_gres_and_cpu_rules_do_not(default_run, cluster, tmp_path):
    """llama.cpp with every layer offloaded declares one GPU: Slurm must record gres/gpu=1 in
    the gpu partition. This node's "GPU" is a stand-in device and our llama.cpp has no CUDA:
    the job first fails fast (the fail-fast users get), then runs on the CPU under the
    test-only switch LLMPIPE_TEST_FAKE_GRES=1, so the gres can be checked."""
    workdir = copy_run(default_run, tmp_path / "w")
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.setdefault("evaluate", {}).setdefault("llama_cpp", {})["n_gpu_layers"] = -1
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    target = "results/eval/smollm2/reference-llama.cpp.json"
    args = (*profile_args(cluster), "--forcerun=evaluate_reference", target)
    refused = snakemake(workdir, *args, env=cluster.env, check=False)
    assert refused.returncode != 0
    log = (workdir / "logs/evaluate_reference/smollm2-llama.cpp.log").read_text()
    assert "evaluate_reference: error: evaluate_reference on " in log, log
    assert "needs a GPU, but" in log and not (workdir / target).exists()
    snakemake(workdir, "--unlock")
    snakemake(
        workdir,
        *args,  # "--forcerun=": the option takes a list, not the target
        env={**cluster.env, "LLMPIPE_TEST_FAKE_GRES": "1"},
    )
    jobs = slurm_job_ids(workdir)
    assert jobs.get("evaluate_reference"), jobs
    for job_id in jobs["evaluate_reference"]:
        record = cluster.job_resources(job_id)
        assert record.gpus == 1 and record.alloc_tres.get("gres/gpu:v100d32q") == "1", record
        assert record.scontrol.get("Partition", "gpu") == "gpu"
