"""evaluate on the default model, end to end: every figure present, the quality ordering, token
counts that match the texts, and a sharded farm that reproduces the unsharded run."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from helpers import REPO, default_config, make_workdir, parse_job_stats, snakemake

from llmpipe.config import read_prompts
from llmpipe.evaluation.jobs import REQUIRED_KEYS

pytestmark = pytest.mark.workflow
LLAMA_VARIANTS = ("F16", "Q8_0", "Q4_K_M")
RUNS = [(v, "llama.cpp") for v in LLAMA_VARIANTS] + [("hf", "transformers")]
PROMPTS = read_prompts(REPO / "config" / "prompts.txt")


def eval_json(run: Path, variant: str, backend: str) -> dict:
    return json.loads((run / f"results/eval/smollm2/{variant}-{backend}.json").read_text())


def texts(run: Path, variant: str, backend: str) -> list[dict]:
    path = run / f"results/eval/smollm2/{variant}-{backend}.texts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("variant", "backend"), RUNS)
def test_every_figure_is_present_and_finite(default_run, variant, backend):
    record = eval_json(default_run, variant, backend)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    assert not missing, f"missing keys: {missing}"
    for key in REQUIRED_KEYS:
        value = record[key]
        if key == "peak_vram_mb":
            assert value is None or value > 0  # null on the CPU
        elif key == "load_source":
            assert value in ("ram_disk", "disk")
        else:
            assert isinstance(value, int | float) and math.isfinite(value), (key, value)
            assert value >= 0, (key, value)
    assert record["load_source"] == "ram_disk"
    assert record["roofline_pct"] > 0
    assert record["peak_bandwidth_gb_s"] > 0 and record["achieved_gb_s"] > 0
    # FLOPs ~ 2 x params per generated token at least (SmolLM2: 134.5 M parameters)
    assert record["flops"] >= 2 * 134e6 * record["generated_tokens"]
    assert record["tokens_per_min"] == pytest.approx(
        60 * record["generated_tokens"] / record["wall_s"]
    )


@pytest.mark.parametrize(("variant", "backend"), RUNS)
def test_decode_speed_is_reported_per_sequence_and_aggregate(default_run, variant, backend):
    """The default run decodes several prompts together on both backends (llama.cpp's
    parallel sequences, a transformers batch): the aggregate counts every sequence's tokens
    over the shared steps' time, the per-sequence speed each prompt's own time, so with more
    than one sequence per step the aggregate is the larger."""
    record = eval_json(default_run, variant, backend)
    config = default_config()["evaluate"]
    section = config["llama_cpp"] if backend == "llama.cpp" else config["transformers"]
    expected = section["parallel"] if backend == "llama.cpp" else section["batch_size"]
    assert record["decode_sequences"] == min(expected, len(PROMPTS)) > 1
    totals = record["totals"]
    assert record["decode_tok_s_aggregate"] == pytest.approx(
        totals["decode_tokens"] / totals["decode_s"]
    )
    assert record["decode_tok_s_per_sequence"] == pytest.approx(
        totals["decode_tokens"] / totals["sequence_decode_s"]
    )
    assert record["decode_tok_s_aggregate"] > record["decode_tok_s_per_sequence"]
    assert totals["decode_steps"] < totals["decode_tokens"]


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_parallel_decoding_gives_the_one_at_a_time_texts(default_run, smollm2_gguf, variant):
    """Greedy decoding of the default prompts with `parallel` sequences in one context (the
    default run) gives exactly the tokens of one prompt at a time: each sequence has its own
    cells and prompt pass; only the decode step's matrix products see several rows."""
    from llmpipe.evaluation import llama_backend as lb
    from llmpipe.evaluation.records import Sampling

    config = default_config()["evaluate"]
    assert config["llama_cpp"]["parallel"] > 1 and config["sampling"]["temperature"] == 0
    settings = lb.LlamaSettings.from_config({**config["llama_cpp"], "parallel": 1}, threads=2)
    llm = lb.load(str(smollm2_gguf(variant)), settings)
    try:
        alone = lb.generate(llm, list(enumerate(PROMPTS)), Sampling.from_config(config["sampling"]))
    finally:
        llm.close()
    together = texts(default_run, variant, "llama.cpp")
    assert [t["token_ids"] for t in together] == [r.token_ids for r in alone]
    assert [t["text"] for t in together] == [r.text for r in alone]


def test_quality_ordering_against_the_f16_reference(default_run):
    f16, q8, q4 = (eval_json(default_run, v, "llama.cpp") for v in LLAMA_VARIANTS)
    assert f16["ppl_ratio"] == 1.0 and f16["kld_mean"] == 0.0
    assert 0 < q8["kld_mean"] < q4["kld_mean"]
    assert q8["kld_p99"] < q4["kld_p99"]
    assert abs(q8["ppl"] / f16["ppl"] - 1) < 0.02
    assert q8["same_top_pct"] > q4["same_top_pct"]
    assert q8["quality"]["scored_tokens"] == 8 * 255  # 8 chunks of 512, second halves scored
    hf = eval_json(default_run, "hf", "transformers")
    assert abs(hf["ppl"] / f16["ppl"] - 1) < 0.02  # fp32 HF vs F16 GGUF: the same model


@pytest.mark.parametrize(("variant", "backend"), RUNS)
def test_token_counts_match_the_texts(default_run, variant, backend, smollm2_hf, smollm2_gguf):
    record = eval_json(default_run, variant, backend)
    lines = texts(default_run, variant, backend)
    prompts = read_prompts(default_run / "config" / "prompts.txt")
    assert [line["prompt"] for line in lines] == prompts
    assert sum(len(line["token_ids"]) for line in lines) == record["generated_tokens"]
    assert all(len(line["token_ids"]) == line["generated_tokens"] for line in lines)
    assert sum(line["prompt_tokens"] for line in lines) == record["prompt_tokens"]
    max_new = record["sampling"]["max_new_tokens"]
    assert all(0 < line["generated_tokens"] <= max_new for line in lines)
    if backend == "transformers":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2_hf)

        def decode(ids):
            return tok.decode(ids, skip_special_tokens=True)

        def count(prompt):
            return len(tok(prompt).input_ids)
    else:
        import llama_cpp

        vocab = llama_cpp.Llama(str(smollm2_gguf(variant)), vocab_only=True, verbose=False)

        def decode(ids):
            return vocab.detokenize(ids).decode("utf-8", errors="replace")

        def count(prompt):
            add_bos = llama_cpp.llama_vocab_get_add_bos(
                llama_cpp.llama_model_get_vocab(vocab.model)
            )
            return len(vocab.tokenize(prompt.encode(), add_bos=add_bos, special=False))

    for line in lines:
        ids = line["token_ids"][:-1] if line["stop"] == "eos" else line["token_ids"]
        assert decode(ids) == line["text"]
        assert count(line["prompt"]) == line["prompt_tokens"]


def _link_tree(src: Path, dest: Path) -> None:
    """Hard links where the file system allows (same mtimes, no copy), else copies."""

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link, dirs_exist_ok=True)


def test_sharded_farm_equals_the_unsharded_run(default_run, tmp_path):
    """Greedy llama.cpp decoding (each prompt from an empty KV cache, its own sampler) gives the
    same tokens whichever shard a prompt runs in. (transformers batches several prompts in one
    forward pass, whose numerics may differ slightly with the batch: not used for this test.)"""
    config = default_config()
    config["farm"] = {"shards": 3}
    work = make_workdir(tmp_path / "farm", config)
    for sub in ("models/smollm2", "gguf/smollm2", "staged/smollm2", "eval/bandwidth"):
        _link_tree(default_run / "results" / sub, work / "results" / sub)
    for name in ("reference-llama.cpp.json", "quality/Q4_K_M-llama.cpp.json"):
        dest = work / "results/eval/smollm2" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(default_run / "results/eval/smollm2" / name, dest)
    target = "results/eval/smollm2/Q4_K_M-llama.cpp.json"
    # The linked results have no Snakemake metadata in this workdir: judge them by mtime only.
    mtime = ("--rerun-triggers", "mtime")
    dry = snakemake(work, "-n", target, *mtime, "--quiet", "rules")
    plan = parse_job_stats(dry.stdout + dry.stderr)
    assert plan == {"split_prompts": 1, "evaluate_shard": 3, "evaluate": 1}, plan
    snakemake(work, target, "--cores", "2", *mtime)
    sharded, single = (
        eval_json(work, "Q4_K_M", "llama.cpp"),
        eval_json(default_run, "Q4_K_M", "llama.cpp"),
    )
    assert sharded["totals"]["shards"] == 3 and single["totals"]["shards"] == 1
    assert texts(work, "Q4_K_M", "llama.cpp") == texts(default_run, "Q4_K_M", "llama.cpp")
    for key in ("prompt_tokens", "generated_tokens", "flops"):
        assert sharded[key] == single[key]
    shards = sorted((work / "results/eval/smollm2/shards/Q4_K_M-llama.cpp").glob("*.json"))
    records = [json.loads(p.read_text()) for p in shards]
    assert sum(r["generated_tokens"] for r in records) == sharded["generated_tokens"]
    start = min(r["started_at"] for r in records)
    assert sharded["wall_s"] == pytest.approx(max(r["finished_at"] for r in records) - start)


def test_greedy_argmax_picks_what_llamas_greedy_sampler_picks(smollm2_gguf):
    """Plain greedy reads the argmax off the logits instead of running the sampler chain: the
    same tokens for every default prompt (Q8_0, 24 new tokens)."""
    from llmpipe.evaluation import llama_backend as lb
    from llmpipe.evaluation.records import Sampling

    llm = lb.load(str(smollm2_gguf("Q8_0")), lb.LlamaSettings.from_config({}, threads=2))
    prompts = list(enumerate(read_prompts("config/prompts.txt")))
    sampling = Sampling(max_new_tokens=24, temperature=0.0)
    fast = lb.generate(llm, prompts, sampling, argmax_greedy=True)
    chain = lb.generate(llm, prompts, sampling, argmax_greedy=False)
    assert [r.token_ids for r in fast] == [r.token_ids for r in chain]
    assert sum(len(r.token_ids) for r in fast) > 10 * 5  # real generations, not empty ones
