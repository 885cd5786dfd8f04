"""The whole workflow on the default model: outputs, fidelity, and the staleness promise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import copy_run, planned_jobs

from llmpipe.errors import IntegrityError
from llmpipe.gguf import gguf_info

pytestmark = pytest.mark.workflow
VARIANTS = ("F16", "Q8_0", "Q4_K_M")
CHAIN = ("download", "cache_to_shm", "convert_to_gguf", "quantize")


def test_default_run_leaves_ggufs_with_records(default_run):
    gguf_dir = default_run / "results" / "gguf" / "smollm2"
    records = {v: json.loads((gguf_dir / f"smollm2-{v}.json").read_text()) for v in VARIANTS}
    for variant, record in records.items():
        path = gguf_dir / f"smollm2-{variant}.gguf"
        assert record["size_bytes"] == path.stat().st_size
        assert record["n_params"] == 134_515_008  # SmolLM2-135M, tied embeddings
        assert record["seconds"] > 0 and record["provenance"]["packages"]["llama_cpp_python"]
    bpw = [records[v]["bits_per_weight"] for v in VARIANTS]
    assert 15.5 < bpw[0] <= 16.1 and bpw[0] > bpw[1] > bpw[2]  # F16 > Q8_0 > Q4_K_M
    staged = json.loads((default_run / "results/staged/smollm2/stage.json").read_text())
    assert staged["bytes"] > 2.5e8 and Path(staged["path"]).is_dir()
    assert (
        json.loads((gguf_dir / "smollm2-F16.json").read_text())["staged_input"]["load_source"]
        == "ram_disk"
    )


def test_second_run_schedules_nothing(default_run):
    assert planned_jobs(default_run) == {}


def test_f16_gguf_logits_match_the_hf_folder(smollm2_hf, smollm2_gguf):
    """F32 KV cache, fp32 transformers: the F16 file differs only by f16 activations in matmuls."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(
        str(smollm2_gguf("F16")),
        n_ctx=256,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Paris is the capital of France, and Berlin is",
        "def add(a, b):\n    return a + b",
    ]
    for text in sentences:
        ids = tok(text)["input_ids"]
        with torch.inference_mode():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
        # Measured here: max |diff| 0.03-0.07 on logits of magnitude ~30 (0.2%).
        assert np.abs(ref - got).max() < 0.15, text
        assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.9, text


@pytest.mark.parametrize("variant", ["Q8_0", "Q4_K_M"])
def test_quantized_files_load_and_generate(smollm2_gguf, variant):
    import llama_cpp

    llm = llama_cpp.Llama(str(smollm2_gguf(variant)), n_ctx=256, verbose=False, n_threads=2)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip()


def test_truncated_gguf_is_refused(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf("Q4_K_M"), "rb") as src:
        cut.write_bytes(src.read(50_000_000))
    with pytest.raises(IntegrityError, match="truncated"):
        gguf_info(cut)
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(IntegrityError, match="not a GGUF"):
        gguf_info(tmp_path / "not.gguf")


@pytest.fixture
def run_copy(default_run, tmp_path) -> Path:
    return copy_run(default_run, tmp_path / "copy")


def edit_config(workdir: Path, edit) -> None:
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_copy_of_a_finished_run_is_up_to_date(run_copy):
    assert planned_jobs(run_copy) == {}


def test_adding_a_quant_type_schedules_only_that_quantize(run_copy):
    edit_config(run_copy, lambda c: c["quantize"]["types"].append("Q6_K"))
    config = yaml.safe_load((run_copy / "config" / "config.yaml").read_text())
    # One new quantization per model in the run: the base models and their tuned <id>-ft.
    n_models = len(config["models"]) + len(config["finetune"]["enabled_for"])
    jobs = planned_jobs(run_copy)
    assert n_models == 2 and jobs.get("quantize") == n_models
    assert not any(jobs.get(rule) for rule in CHAIN[:3])


def test_adding_a_model_schedules_only_its_chain(run_copy, smollm2_hf):
    edit_config(
        run_copy, lambda c: c["models"].update(twin={"source": "dir", "path": str(smollm2_hf)})
    )
    jobs = planned_jobs(run_copy)
    assert {rule: jobs.get(rule) for rule in CHAIN} == {
        "download": 1,
        "cache_to_shm": 1,
        "convert_to_gguf": 1,
        "quantize": 2,
    }


def test_editing_prompts_does_not_touch_the_model_chain(run_copy):
    prompts = run_copy / "config" / "prompts.txt"
    prompts.write_text(prompts.read_text() + "A new prompt about Slurm.\n")
    jobs = planned_jobs(run_copy)
    assert not any(jobs.get(rule) for rule in CHAIN)
