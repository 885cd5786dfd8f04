"""The default run's fine-tune: SmolLM2 tuned on the built-in task, and smollm2-ft's own chain."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import copy_run, planned_jobs

from llmpipe import manifest

pytestmark = pytest.mark.workflow
FT = "results/finetune/smollm2"


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tuned_model_beats_its_base_on_the_heldout_task(default_run):
    rows = {r["role"]: r for r in read_csv(default_run / FT / "comparison.csv")}
    base, tuned = rows["base"], rows["tuned"]
    assert (base["model"], tuned["model"]) == ("smollm2", "smollm2-ft")
    assert int(base["examples"]) == int(tuned["examples"]) == 100
    assert float(tuned["accuracy"]) > float(base["accuracy"])
    assert float(tuned["accuracy"]) >= float(base["accuracy"]) + 0.5  # clearly, not by luck
    assert float(tuned["perplexity"]) < float(base["perplexity"])
    table = (default_run / FT / "comparison.md").read_text()
    assert "| base | smollm2 |" in table and "| tuned | smollm2-ft |" in table
    predictions = (default_run / FT / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 100
    first = json.loads(predictions[0])
    assert first["tuned_correct"] == (first["tuned"].strip() == first["reference"])


def test_heldout_loss_falls_and_the_run_is_measured(default_run):
    rows = read_csv(default_run / FT / "loss.csv")
    heldout = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == "heldout"]
    train = [r for r in rows if r["split"] == "train"]
    metrics = json.loads((default_run / FT / "metrics.json").read_text())
    assert heldout[0][0] == 0 and heldout[-1][0] == metrics["steps"] == len(train)
    assert heldout[-1][1] < 0.5 * heldout[0][1]
    assert (default_run / FT / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["tokens_per_s"] > 0 and metrics["peak_rss_mb"] > 500
    assert metrics["processes"] == 1 and metrics["device"] == "cpu"
    flops = metrics["flops"]
    assert 0 < flops["total"] < flops["full_finetune_equivalent"]
    assert flops["n_body"] + flops["n_head"] < metrics["base_params"] + flops["n_head"]
    assert metrics["provenance"]["seed"] == metrics["settings"]["seed"]
    assert metrics["measured"]["peak_rss_mb"] > 0 and metrics["predicted"]["step"] == "finetune"


def test_adapter_loads_with_peft(default_run, smollm2_hf):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_hf)
    model = PeftModel.from_pretrained(base, default_run / FT / "adapter")
    config = model.peft_config["default"]
    assert config.peft_type == "LORA" and set(config.target_modules) >= {"q_proj", "down_proj"}


def test_tuned_model_is_a_model_of_its_own(default_run):
    record = json.loads((default_run / "results/models/smollm2-ft/manifest.json").read_text())
    base = json.loads((default_run / "results/models/smollm2/manifest.json").read_text())
    assert record["model"] == "smollm2-ft" and record["source"]["kind"] == "finetune"
    assert record["source"]["base"] == "smollm2"
    assert record["source"]["base_fingerprint"] == base["fingerprint"]
    assert set(base) <= set(record)  # the download's manifest format, same keys
    assert record["fingerprint"] == manifest.fingerprint(record)
    manifest.verify(default_run / "results/models/smollm2-ft/hf", record, check_hash=True)
    assert record["fingerprint"] != base["fingerprint"]
    # ... and it went through the chain like any model: GGUFs, quantizations, evaluations.
    gguf = default_run / "results/gguf/smollm2-ft"
    for variant in ("F16", "Q8_0", "Q4_K_M"):
        info = json.loads((gguf / f"smollm2-ft-{variant}.json").read_text())
        assert info["size_bytes"] == (gguf / f"smollm2-ft-{variant}.gguf").stat().st_size
        assert info["n_params"] == 134_515_008
    evals = sorted(p.name for p in (default_run / "results/eval/smollm2-ft").glob("*.json"))
    assert "Q4_K_M-llama.cpp.json" in evals and "hf-transformers.json" in evals


def test_gguf_adapter_on_the_base_gguf_answers_like_the_tuned_model(default_run, smollm2_hf):
    """llama.cpp applies adapter-F16.gguf to the base F16 GGUF at load time."""
    import llama_cpp
    from transformers import AutoTokenizer

    from llmpipe.finetune import dataset as ds

    record = json.loads((default_run / FT / "adapter-F16.json").read_text())
    assert record["n_tensors"] == 30 * 7 * 2  # lora_a and lora_b of 7 projections x 30 layers
    heldout = ds.read_jsonl(default_run / FT / "data/heldout.jsonl")[:3]
    tok = AutoTokenizer.from_pretrained(smollm2_hf)

    def answers(model: str, lora: str | None = None) -> list[str]:
        llm = llama_cpp.Llama(
            str(default_run / model), lora_path=lora, n_ctx=256, n_threads=2, verbose=False
        )
        out = []
        for r in heldout:
            prompt, _ = ds.render(tok, r)
            done = llm.create_completion(
                prompt, max_tokens=32, temperature=0.0, stop=["<|im_end|>"]
            )
            out.append(done["choices"][0]["text"].strip())
        return out

    with_adapter = answers(
        "results/gguf/smollm2/smollm2-F16.gguf", str(default_run / FT / "adapter-F16.gguf")
    )
    merged = answers("results/gguf/smollm2-ft/smollm2-ft-F16.gguf")
    assert with_adapter == merged
    assert sum(a == r["response"] for a, r in zip(merged, heldout, strict=True)) >= 2


def test_tuned_model_folder_comes_from_merge_lora_not_download(default_run, tmp_path):
    # Remade on purpose, the tuned model's folder comes from merging the existing adapter: no
    # download, no training; its own chain follows (convert, quantize, evaluate).
    run = copy_run(default_run, tmp_path / "run")
    jobs = planned_jobs(run, "--forcerun=results/models/smollm2-ft/manifest.json")
    assert jobs.get("merge_lora") == 1 and "download" not in jobs and "finetune" not in jobs
    assert jobs.get("convert_to_gguf") == 1 and jobs.get("quantize") == 2
    assert "cache_to_shm" in jobs and jobs.get("evaluate") == 4
