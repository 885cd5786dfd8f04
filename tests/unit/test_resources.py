"""Rule resources from the estimator, and the estimator against what the jobs measured.

The workflow test prints the predicted-vs-measured table of the default run (pytest -s shows
it) and holds every rule's predicted peak memory within 25 % of the measured peak.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_workdir, parse_job_stats, snakemake

from llmpipe import estimate as est
from llmpipe import report
from llmpipe import resources as res

FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
SMOLLM2 = FIXTURES / "smollm2-135m.json"
LLAMA7B = FIXTURES / "llama-2-7b.json"
TOLERANCE = 0.25


# ---- planning ------------------------------------------------------------------------------


def test_plan_uses_the_calibrated_estimator_with_margin():
    p = res.plan("quantize", LLAMA7B, quant="Q4_K_M", threads=2)
    e = est.quantize(est.ModelShape.from_config(LLAMA7B), "Q4_K_M", threads=2, a=est.CALIBRATED)
    assert p.mem_mb == max(res.MIN_MEM_MB, e.mem_mb)
    assert p.peak_mb == pytest.approx(e.detail["host_peak_bytes"] / est.MIB, abs=0.1)
    assert p.mem_mb >= p.peak_mb * 1.25 - 1
    assert p.runtime_min == e.runtime_min and p.basis == str(LLAMA7B)


def test_stage_and_convert_count_the_ram_disk():
    stage = res.plan("cache_to_shm", LLAMA7B)
    assert stage.shm_mb == pytest.approx(13_476_831_232 / est.MIB, abs=0.1)
    assert stage.mem_mb > stage.shm_mb * 1.25
    convert = res.plan("convert_to_gguf", LLAMA7B, outtype="f16")
    assert convert.shm_mb == stage.shm_mb  # the converter reads (or re-stages) its RAM-disk copy
    assert res.plan("convert_to_gguf", LLAMA7B, outtype="f16", staged=False).shm_mb == 0


def test_request_scales_with_attempt_and_falls_back_without_config(tmp_path):
    one = res.request("cache_to_shm", LLAMA7B, attempt=1)
    two = res.request("cache_to_shm", LLAMA7B, attempt=2)
    assert two.mem_mb == 2 * one.mem_mb and two.runtime_min == 2 * one.runtime_min
    missing = res.plan("convert_to_gguf", tmp_path / "nope" / "config.json")
    assert missing.basis == "fallback"
    assert (missing.mem_mb, missing.runtime_min) == res.FALLBACK["convert_to_gguf"]
    # a type the estimator cannot size falls back instead of failing the planner
    assert res.plan("quantize", LLAMA7B, quant="TQ1_0").basis == "fallback"


def test_threads_only_reach_estimators_that_take_them():
    res.plan("cache_to_shm", SMOLLM2, threads=4)  # stage() has no threads: dropped, no error
    with pytest.raises(TypeError):
        res.plan("cache_to_shm", SMOLLM2, quant="Q8_0")  # a typo'd option is not swallowed


def test_gpu_steps_give_gpu_counts_and_cpu_steps_none():
    assert res.plan("evaluate_transformers", FIXTURES / "llama-2-13b.json", hw="v100").gpus == 2
    assert res.plan("evaluate_llama_cpp", SMOLLM2, hw="cpu", quant="Q8_0").gpus == 0
    assert res.plan("finetune", LLAMA7B, method="qlora", hw="v100").gpus == 1


def test_model_config_of_a_derived_model(tmp_path):
    hf = tmp_path / "results" / "models" / "base" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(SMOLLM2.read_text())
    assert res.model_config("base", root=tmp_path) == hf / "config.json"
    # the fine-tuned `base-ft` has no folder of its own: it has the base model's shape
    assert res.model_config("base-ft", ["base"], root=tmp_path) == hf / "config.json"
    assert res.model_config("base-ft", root=tmp_path) == hf / "config.json"  # from the folders
    assert res.model_config("other", ["base"], root=tmp_path).parent.parent.name == "other"
    assert res.model_config("based", ["base"], root=tmp_path).parent.parent.name == "based"


def test_download_options_and_config(tmp_path):
    assert res.download_options({"source": "package", "dtype": "float16"}) == {
        "source": "package",
        "dtype": "float16",
    }
    assert res.download_options({"source": "dir", "path": "/x"})["dtype"] is None
    spec = {"source": "dir", "path": str(tmp_path)}
    assert res.download_config(spec, "m") == tmp_path / "config.json"
    pkg = res.plan("download", SMOLLM2, source="package", dtype="float16")
    link = res.plan("download", SMOLLM2, source="dir")
    assert pkg.peak_mb > link.peak_mb + 700  # the f32 model and its f16 copy are held at once


def test_shm_written_bytes():
    assert res.shm_written_bytes({"hit": False, "bytes": 10}) == 10
    assert res.shm_written_bytes({"hit": True, "bytes": 10}) == 0
    assert res.shm_written_bytes({"staged_input": {"hit": False, "bytes": 7}}) == 7
    assert res.shm_written_bytes({"staged_input": {"load_source": "disk"}}) == 0
    assert res.shm_written_bytes(None) == 0


def test_usage_records_prediction_next_to_measurement():
    usage = res.Usage("quantize", SMOLLM2, {"quant": "Q8_0"}, {"mem_mb": 1000})
    with usage:
        block = bytearray(200 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        fields = usage.fields({"hit": False, "bytes": 50 * 2**20})
        del block
    assert fields["measured"]["peak_rss_mb"] >= 200
    assert fields["measured"]["shm_mb"] == 50
    assert fields["measured"]["peak_mem_mb"] == pytest.approx(
        fields["measured"]["peak_rss_mb"] + 50, abs=0.2
    )
    assert fields["predicted"]["step"] == "quantize" and fields["predicted"]["peak_mb"] > 0
    assert fields["predicted"]["requested"] == {"mem_mb": 1000}
    assert "gpu" not in fields or fields["gpu"]["nvidia_smi"]


def test_planner_module_has_no_heavy_imports():
    code = (
        "import sys, llmpipe.resources; "
        "print([m for m in ('torch', 'transformers', 'numpy', 'pandas', 'matplotlib', 'psutil')"
        " if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.workflow
def test_dry_run_shows_fallback_requests(tmp_path):
    """Before any config.json exists the planner shows the conservative fallback."""
    workdir = make_workdir(tmp_path / "fresh")
    out = snakemake(workdir, "-n", "results/staged/smollm2/stage.json")
    mem, runtime = res.FALLBACK["cache_to_shm"]
    assert f"runtime={runtime}, mem_mb={mem}" in out.stdout
    assert parse_job_stats(out.stdout + out.stderr) == {"download": 1, "cache_to_shm": 1}


# ---- predicted vs measured on the default run ----------------------------------------------


def _foundation_records(run: Path) -> list[Path]:
    """download (base models: a tuned model's folder comes from merge_lora), cache_to_shm,
    convert_to_gguf and quantize records of the run."""
    config = yaml.safe_load((run / "config" / "config.yaml").read_text())
    manifests = [run / "results" / "models" / m / "manifest.json" for m in config["models"]]
    staged = sorted(run.glob("results/staged/*/stage.json"))
    return [*manifests, *staged, *sorted(run.glob("results/gguf/*/*.json"))]


def _job_records(run: Path) -> list[Path]:
    """Every record a heavy job wrote: the foundation's, the tuned model's manifest (merge),
    the evaluation shards' and the perplexity jobs'."""
    return [
        *_foundation_records(run),
        *sorted(run.glob("results/models/*-ft/manifest.json")),
        *sorted(run.glob("results/eval/*/shards/*/*.json")),
        *sorted(run.glob("results/eval/*/reference-*.json")),
        *sorted(run.glob("results/eval/*/quality/*.json")),
        *sorted(run.glob("results/finetune/*/comparison.json")),
    ]


@pytest.mark.workflow
def test_every_job_record_has_prediction_and_measurement(default_run):
    records = _job_records(default_run)
    rules = set()
    for path in records:
        record = json.loads(path.read_text())
        pred, meas = record["predicted"], record["measured"]
        rules.add(pred.get("rule") or pred["step"])
        assert pred["basis"].endswith("config.json"), path
        assert pred["peak_mb"] > 0 and pred["mem_mb"] >= pred["peak_mb"]
        assert pred["runtime_min"] >= 1 and pred["runtime_s"] > 0
        assert pred["requested"]["mem_mb"] >= 1000 and pred["requested"]["runtime_min"] >= 1
        assert meas["peak_rss_mb"] > 0 and meas["wall_s"] > 0 and meas["samples"] >= 1
        assert meas["peak_mem_mb"] >= meas["peak_rss_mb"]
        assert "provenance" in record
    assert rules == {
        "download",
        "cache_to_shm",
        "convert_to_gguf",
        "quantize",
        "merge_lora",
        "evaluate_shard",
        "evaluate_reference",
        "evaluate_quality",
        "compare_finetune",
    }


@pytest.mark.workflow
def test_predicted_memory_within_25_percent_of_measured(default_run):
    """Every job in results/stats/resources.csv (the table is printed: pytest -s): each job
    recorded the prediction its resources came from next to what it measured."""
    with open(default_run / "results" / "stats" / "resources.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    print()
    print(report.resources_table(rows))
    rules = {r["rule"] for r in rows}
    assert rules >= {
        "download",
        "cache_to_shm",
        "convert_to_gguf",
        "quantize",
        "finetune",
        "merge_lora",
        "evaluate_reference",
        "evaluate_quality",
        "evaluate_llama_cpp",
        "evaluate_transformers",
        "compare_finetune",
    }
    off = []
    for r in rows:
        ratio = float(r["mem_ratio"])
        assert math.isfinite(ratio), r
        if not 1 - TOLERANCE <= ratio <= 1 + TOLERANCE:
            off.append(
                f"{r['rule']} {r['model']} {r['target']}: predicted {r['predicted_as_run_mb']} "
                f"MiB, measured {r['measured_peak_mem_mb']} MiB (x{ratio})"
            )
    assert not off, "\n".join(off)
    # the fresh run wrote its RAM-disk copy in cache_to_shm: counted on both sides
    stage = next(r for r in rows if r["rule"] == "cache_to_shm")
    assert float(stage["measured_shm_mb"]) > 200 and float(stage["predicted_shm_mb"]) > 200
