"""Rule resources from the estimator, and the estimator against what the jobs measured.

The workflow test prints the predicted-vs-measured table of the default run (pytest -s shows
it) and holds every rule's predicted peak memory within 25 % of the measured peak.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmpipe import estimate as est
from llmpipe import resources as res

FIXTURES = Path(__file__).parents[1] / "fixtures" / "model_configs"
SMOLLM2 = FIXTURES / "smollm2-135m.json"
LLAMA7B = FIXTURES / "llama-2-7b.json"


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
    assert res.plan("evaluate_transformers", FIXTURES / "llama-2-13b.json", hw="gpu").gpus == 2
    assert res.plan("evaluate_llama_cpp", SMOLLM2, hw="cpu", quant="Q8_0").gpus == 0
    assert res.plan("finetune", LLAMA7B, method="qlora", hw="gpu").gpus == 1


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


# ---- predicted vs measured on the default run ----------------------------------------------
