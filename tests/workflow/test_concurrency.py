"""Parallel jobs share the RAM disk and the outputs folder without corrupting anything."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import copy_run, planned_jobs, snakemake

from llmpipe import manifest
from llmpipe.gguf import gguf_info

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def test_a_new_model_and_a_new_quant_type_in_parallel(default_run, smollm2_hf, tmp_path):
    workdir = copy_run(default_run, tmp_path / "w")
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["quantize"]["types"].append("Q6_K")
    for twin in ("twin",):
        config["models"][twin] = {"source": "dir", "path": str(smollm2_hf)}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2", "--until", "quantize")
    assert planned_jobs(workdir, "--until", "quantize") == {}
    base = gguf_info(workdir / "results/gguf/smollm2/smollm2-Q6_K.gguf")
    for twin in ("twin",):
        staged = json.loads((workdir / f"results/staged/{twin}/stage.json").read_text())
        hf_manifest = manifest.load(workdir / f"results/models/{twin}/manifest.json")
        manifest.verify(staged["path"], hf_manifest, check_hash=True)
        for quant in ("F16", "Q8_0", "Q4_K_M", "Q6_K"):
            gguf = workdir / f"results/gguf/{twin}/{twin}-{quant}.gguf"
            record = json.loads(gguf.with_suffix(".json").read_text())
            assert manifest.sha256_file(gguf) == record["sha256"]
            info = gguf_info(gguf)
            smol = gguf_info(workdir / f"results/gguf/smollm2/smollm2-{quant}.gguf")
            assert info["tensor_bytes"] == smol["tensor_bytes"]  # same weights, same layout
        assert (
            gguf_info(workdir / f"results/gguf/{twin}/{twin}-Q6_K.gguf")["n_params"]
            == (base["n_params"])
        )
    # The original run was hard-linked, never modified in place.
    assert planned_jobs(default_run) == {}
