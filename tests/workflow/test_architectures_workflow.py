"""An architecture llama.cpp cannot run is planned transformers-only by the real workflow."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import default_config, make_tiny_hf, make_workdir, parse_job_stats, snakemake

fault = pytest.mark.fault
pytestmark = pytest.mark.workflow


@fault(
    "an architecture llama.cpp cannot run (planned around, with the reason)",
    "acme: GGUF steps not converted: architecture AcmeForCausalLM is not one of the",
)
def test_unsupported_architecture_is_planned_transformers_only(tmp_path):
    hf = make_tiny_hf(tmp_path / "scratch" / "acme")
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["AcmeForCausalLM"]
    (hf / "config.json").write_text(json.dumps(config))
    cfg = default_config()
    cfg["models"] = {"acme": {"source": "dir", "path": str(hf)}}
    cfg["finetune"] = {"enabled_for": [], "defaults": {}, "models": {}}
    workdir = make_workdir(tmp_path / "run", cfg)
    done = snakemake(workdir, "-n")
    out = done.stdout + done.stderr
    assert "acme: GGUF steps not converted: architecture AcmeForCausalLM is not one of the" in out
    jobs = parse_job_stats(out)
    assert "convert_to_gguf" not in jobs and "quantize" not in jobs
    assert jobs["evaluate"] == 1 and jobs["aggregate_stats"] == 1  # the transformers evaluation
    shutil.rmtree(workdir)
