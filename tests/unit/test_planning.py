"""llmpipe.planning: what the workflow derives from its config, without Snakemake."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from llmpipe import config as cfg
from llmpipe import planning
from llmpipe.errors import ResourceError
from llmpipe.finetune import settings as ft

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
FIXTURES = REPO / "tests" / "fixtures" / "model_configs"


def load(config: dict, root: Path) -> planning.RunPlan:
    config = copy.deepcopy(config)
    cfg.validate(config, SCHEMA)
    cfg.check(config)
    ft.check(config)
    return planning.RunPlan(config, root=root)


@pytest.fixture
def default_config() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    # relative paths of the config (prompts, evaluation text) resolve in the repo
    config["prompts"] = str(REPO / config["prompts"])
    config["evaluate"]["text"] = str(REPO / config["evaluate"]["text"])
    return config


def dir_model(tmp_path: Path, name: str, fixture: str) -> dict:
    folder = tmp_path / "shared" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((FIXTURES / fixture).read_text())
    return {"source": "dir", "path": str(folder)}


def test_default_config_plans_every_variant_of_both_backends(default_config, tmp_path):
    plan = load(default_config, tmp_path)
    # the default run fine-tunes its model: the tuned one goes through the chain too
    assert plan.models == ["smollm2", "smollm2-ft"]
    assert plan.gguf_variants("smollm2") == ["F16", "Q8_0", "Q4_K_M"]
    assert plan.eval_jsons()[:4] == [
        ("smollm2", "F16", "llama.cpp"),
        ("smollm2", "Q8_0", "llama.cpp"),
        ("smollm2", "Q4_K_M", "llama.cpp"),
        ("smollm2", "hf", "transformers"),
    ]
    assert "results/finetune/smollm2/adapter" in plan.finetune_outputs()
    outputs = plan.final_outputs()
    assert len(outputs) == len(set(outputs))
    assert "results/gguf/smollm2/smollm2-Q4_K_M.gguf" in outputs
    assert "results/eval/smollm2/hf-transformers.texts.jsonl" in outputs
    assert outputs[-len(planning.STATS_OUTPUTS) :] == planning.STATS_OUTPUTS


def test_stats_jobs_name_each_job_once_and_only_real_quality_jobs(default_config, tmp_path):
    plan = load(default_config, tmp_path)
    jobs = plan.stats_jobs()
    keys = [(j.rule, j.model, j.target) for j in jobs]
    assert len(keys) == len(set(keys))
    assert {j.record_output for j in jobs} <= {"manifest", "record", "result", "metrics"}
    assert ("evaluate_quality", "smollm2", "Q8_0-llama.cpp") in keys
    # the references' quality is their own perplexity job, never a quality job
    assert ("evaluate_quality", "smollm2", "F16-llama.cpp") not in keys
    assert ("evaluate_reference_transformers", "smollm2", "hf-transformers") in keys
    assert ("evaluate_reference", "smollm2", "F16-llama.cpp") in keys
    # the tuned model's folder is the merge's; its files are named after the base model
    assert plan.model_job("smollm2-ft") == ("merge_lora", "smollm2-ft", "", {"model": "smollm2"})
    assert ("finetune", "smollm2-ft", "", {"model": "smollm2"}) in jobs
    # one weights record per evaluation, in the same order
    weights = plan.weights_jobs()
    assert len(weights) == len(plan.eval_jsons())
    assert weights[0] == (
        "convert_to_gguf",
        "smollm2",
        "F16",
        {"model": "smollm2", "reference": "F16"},
    )
    assert weights[3].rule == "download"


def test_an_unsupported_architecture_keeps_its_steps_without_gguf(default_config, tmp_path):
    # Falcon-RW (ALiBi) is a Falcon the pinned converter cannot take
    default_config["models"]["falcon-rw-1b"] = dir_model(tmp_path, "rw", "falcon-rw-1b.json")
    plan = load(default_config, tmp_path)
    assert not plan.gguf_support["falcon-rw-1b"].supported
    assert plan.gguf_variants("falcon-rw-1b") == []
    assert ("falcon-rw-1b", "hf", "transformers") in plan.eval_jsons()
    assert not any(m == "falcon-rw-1b" and b == "llama.cpp" for m, _, b in plan.eval_jsons())
    assert "force_gguf" in plan.gguf_summary_notes()["falcon-rw-1b"]
    assert not any("falcon-rw-1b" in p for p in plan.final_outputs() if p.endswith(".gguf"))


def test_eval_estimates_per_kind(default_config, tmp_path):
    plan = load(default_config, tmp_path)
    step, shard = plan.eval_estimate("llama.cpp", "Q4_K_M", "shard")
    assert step == "evaluate_llama_cpp"
    assert shard["quant"] == "Q4_K_M" and shard["hw"] == "cpu"
    assert shard["new_tokens"] == default_config["evaluate"]["sampling"]["max_new_tokens"]
    assert shard["samples"] == -(-len(plan.prompts) // default_config["farm"]["shards"])
    _, quality = plan.eval_estimate("llama.cpp", "Q4_K_M", "quality")
    assert quality["new_tokens"] == 1 and quality["kld_chunks"] == plan.eval_chunks > 0
    _, reference = plan.eval_estimate("llama.cpp", None, "reference")
    assert reference["quant"] == "F16" and reference["kld_chunks"] == 0
    step, hf = plan.eval_estimate("transformers", "hf", "reference")
    assert step == "evaluate_transformers"
    assert hf["dtype"] == "float32" and hf["full_logits"] and hf["batch"] == 1
    with pytest.raises(ValueError, match="evaluation kind 'sweep'"):
        plan.eval_estimate("llama.cpp", "F16", "sweep")


def test_perplexity_and_imatrix_chunks_are_bounded_by_the_texts_size(default_config, tmp_path):
    text = tmp_path / "short.txt"
    n_ctx = default_config["evaluate"]["perplexity"]["n_ctx"]
    text.write_text("x" * (planning.BYTES_PER_TOKEN * n_ctx * 3))  # three chunks' worth
    default_config["evaluate"]["text"] = str(text)
    default_config["evaluate"]["perplexity"]["chunks"] = 8
    plan = load(default_config, tmp_path)
    assert plan.eval_chunks == 3
    # the importance matrix reads what follows the evaluation's chunks: nothing left, one chunk
    assert plan.imatrix_chunks == 1
    assert plan.imatrix_estimate()["chunks"] == 1


def test_gpu_placement_follows_the_backend_settings(default_config, tmp_path):
    default_config["evaluate"]["llama_cpp"]["n_gpu_layers"] = -1
    plan = load(default_config, tmp_path)
    assert plan.eval_on_gpu("llama.cpp") and not plan.eval_on_gpu("transformers")
    assert plan.eval_estimate("llama.cpp", "F16", "shard")[1]["hw"] == "gpu"
    assert plan.imatrix_estimate()["hw"] == "gpu"
    slurm = plan.config["slurm"]  # the schema's defaults
    assert plan.gres(2) == f"gpu:{slurm['gpu_type']}:2"
    assert plan.gres(0) == "" and plan.partition(0) == ""
    assert plan.partition(1) == slurm["gpu_partition"]


def test_requests_fall_back_before_download_then_follow_the_config(default_config, tmp_path):
    plan = load(default_config, tmp_path)
    before = plan.request("smollm2", "quantize", {"quant": "Q4_K_M"}, threads=2, attempt=1)
    assert before.basis == "fallback"
    hf = tmp_path / "results" / "models" / "smollm2" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text((FIXTURES / "llama-2-7b.json").read_text())
    after = plan.request("smollm2", "quantize", {"quant": "Q4_K_M"}, threads=2, attempt=1)
    assert after.basis == str(hf / "config.json")
    retried = plan.request("smollm2", "quantize", {"quant": "Q4_K_M"}, threads=2, attempt=2)
    assert retried.mem_mb == 2 * after.mem_mb


def test_a_gpu_step_that_cannot_fit_stops_planning(default_config, tmp_path):
    default_config["models"]["llama-2-13b"] = dir_model(tmp_path, "m13", "llama-2-13b.json")
    plan = load(default_config, tmp_path)
    hf = tmp_path / "results" / "models" / "llama-2-13b" / "hf"  # as downloaded
    hf.mkdir(parents=True)
    (hf / "config.json").write_text((FIXTURES / "llama-2-13b.json").read_text())
    options = {"method": "lora", "hw": "gpu", "dtype": "f16", "micro_batch": 16,
               "seq_len": 4096, "gradient_checkpointing": False}  # fmt: skip
    with pytest.raises(ResourceError, match="^llama-2-13b: finetune does not fit: .*would fit"):
        plan.request("llama-2-13b", "finetune", options, threads=2, attempt=1)


def test_modules_per_rule_kind(default_config, tmp_path):
    default_config["envmodules"] = {"transformers": ["python/ai"], "llama_cpp": ["llama.cpp/gpu"]}
    plan = load(default_config, tmp_path)
    assert plan.modules("transformers") == ["python/ai"]
    assert plan.modules("llama_cpp") == ["python/ai", "llama.cpp/gpu"]
    with pytest.raises(ValueError, match="envmodules: no key 'llama.cpp'"):
        plan.modules("llama.cpp")
