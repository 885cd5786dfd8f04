"""The importance matrix in the real workflow: planned per model, and its effect on the KLD."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from helpers import REPO, default_config, make_workdir, planned_jobs, snakemake

GPL = REPO / "config" / "eval" / "gpl-3.0.txt"
pytestmark = pytest.mark.workflow


def test_the_workflow_plans_one_matrix_per_model_for_the_imat_variants(tmp_path):
    config = default_config()
    config["quantize"] = {"types": ["Q4_K_M"], "imatrix": {"types": ["Q4_K_M", "IQ2_XS"]}}
    config["evaluate"] = {"backends": ["llama.cpp"]}
    config["finetune"] = {"enabled_for": []}
    workdir = make_workdir(tmp_path / "w", config)
    jobs = planned_jobs(workdir)
    assert jobs["imatrix"] == 1
    assert jobs["quantize"] == 3  # Q4_K_M, Q4_K_M-imat, IQ2_XS-imat
    assert jobs["evaluate_quality"] == 3
    done = snakemake(workdir, "-n", "results/gguf/smollm2/smollm2-Q4_K_M.gguf")
    assert "rule imatrix" not in done.stdout + done.stderr  # a plain variant needs no matrix


@pytest.fixture(scope="module")
def imatrix_run(tmp_path_factory) -> Path:
    config = copy.deepcopy(default_config())
    config["quantize"] = {"types": ["Q4_K_M", "Q2_K"], "imatrix": {"types": ["Q4_K_M", "Q2_K"]}}
    config["evaluate"] = {"backends": ["llama.cpp"], "sampling": {"max_new_tokens": 8}}
    config["finetune"] = {"enabled_for": []}
    workdir = make_workdir(tmp_path_factory.mktemp("imatrix-run"), config)
    (workdir / "config" / "prompts.txt").write_text("The capital of France is\nOnce upon a time\n")
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.mark.slow
def test_kld_with_an_importance_matrix_is_lower_than_without(imatrix_run):
    quality = imatrix_run / "results" / "eval" / "smollm2" / "quality"
    figures = {}
    for variant in ("Q4_K_M", "Q4_K_M-imat", "Q2_K", "Q2_K-imat"):
        record = json.loads((quality / f"{variant}-llama.cpp.json").read_text())
        assert record["variant"] == variant and record["reference"] == "F16"
        figures[variant] = (record["kld_mean"], record["kld_unc"], record["ppl_ratio"])
    for quant in ("Q4_K_M", "Q2_K"):
        (plain, plain_unc, plain_ppl), (imat_, imat_unc, imat_ppl) = (
            figures[quant],
            figures[f"{quant}-imat"],
        )
        print(
            f"\n{quant}: KLD {plain:.5f} +/- {plain_unc:.5f} (PPL ratio {plain_ppl:.4f}) without, "
            f"{imat_:.5f} +/- {imat_unc:.5f} (PPL ratio {imat_ppl:.4f}) with an importance matrix"
        )
        assert imat_ < plain, quant


@pytest.mark.slow
def test_the_matrix_record_and_the_imat_quantizations(imatrix_run):
    gguf = imatrix_run / "results" / "gguf" / "smollm2"
    record = json.loads((gguf / "smollm2.imatrix.json").read_text())
    calibration = record["calibration"]
    evaluation = record["evaluation"]
    assert calibration["default"] and calibration["from_byte"] == evaluation["byte"] > 0
    assert calibration["bytes"] == GPL.stat().st_size - evaluation["byte"]
    assert calibration["chunks"] == calibration["tokens"] // 512 == 6
    assert evaluation["chunks"] == 8 and evaluation["eval_tokens"] == 8 * 512
    assert record["overlap"] is None and record["warning"] is None
    assert record["predicted"]["step"] == "imatrix" and record["measured"]["peak_mem_mb"] > 0
    assert (gguf / "smollm2.imatrix").read_bytes()[:4] == b"GGUF"
    for quant in ("Q4_K_M", "Q2_K"):
        plain = json.loads((gguf / f"smollm2-{quant}.json").read_text())
        imat_ = json.loads((gguf / f"smollm2-{quant}-imat.json").read_text())
        assert (plain["variant"], plain["type"], plain["imatrix"]) == (quant, quant, None)
        assert (imat_["variant"], imat_["type"]) == (f"{quant}-imat", quant)
        assert imat_["imatrix"]["sha256"] == record["sha256"]
        assert imat_["sha256"] != plain["sha256"]
        assert abs(imat_["size_bytes"] - plain["size_bytes"]) < 0.01 * plain["size_bytes"]
    summary = (imatrix_run / "results" / "stats" / "summary.md").read_text()
    assert "Q4_K_M-imat (llama.cpp)" in summary and "Q2_K-imat (llama.cpp)" in summary
    assert planned_jobs(imatrix_run) == {}  # nothing left to do: the matrix is made once
    assert not [p for p in gguf.iterdir() if p.name.startswith(".tmp-")]
