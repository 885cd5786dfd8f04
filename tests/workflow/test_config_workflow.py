"""Config mistakes and the cluster config, as the real workflow plans them (snakemake -n)."""

from __future__ import annotations

import pytest
import yaml
from helpers import REPO, default_config, make_workdir, parse_job_stats, snakemake

pytestmark = pytest.mark.workflow


def test_bad_config_stops_snakemake_with_one_clear_message(tmp_path):
    config = default_config()
    config["quantize"]["types"] = ["Q4_K_M", "Q4_K_X"]
    workdir = make_workdir(tmp_path / "w", config)
    done = snakemake(workdir, "-n", check=False)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "quantize.types[1]: 'Q4_K_X' is not one of" in output
    assert not (workdir / "results").exists()


def test_cluster_config_dry_run_lists_the_seed_models_with_gpu_requests(tmp_path):
    """The cluster config through the Slurm profile, planned without network or a cluster."""
    workdir = make_workdir(tmp_path / "w")
    cluster = yaml.safe_load((REPO / "config" / "cluster.yaml").read_text())
    (workdir / "config" / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    assert len(cluster["models"]) == 6
    done = snakemake(
        workdir,
        "-n",
        "--profile",
        str(REPO / "profiles" / "slurm"),
        "--configfile",
        "config/cluster.yaml",
    )
    out = done.stdout + done.stderr
    jobs = parse_job_stats(out)
    assert jobs["download"] == 6  # the seed's six models, not the default one merged in
    n_tuned = len(cluster["finetune"]["enabled_for"])
    assert jobs["convert_to_gguf"] == 6 + n_tuned
    assert jobs["quantize"] == (6 + n_tuned) * len(cluster["quantize"]["types"])
    # Each rule display ends with its resources; pick the fine-tune of the 13B model.
    blocks = out.split("rule ")
    tune_13b = next(b for b in blocks if b.startswith("finetune:") and "model=llama-2-13b" in b)
    assert "gres=gpu:v100d32q:1" in tune_13b and "nodes=4" in tune_13b
    assert "slurm_partition=gpu" in tune_13b
    quantize = next(b for b in blocks if b.startswith("quantize:"))
    assert "gres=" not in quantize
