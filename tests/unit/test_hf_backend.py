"""The transformers backend: batched ``model.generate`` with per-prompt seeds and its clock.

A tiny random-init Llama with a word-level tokenizer (tests/helpers.py, seconds) stands in
for the real checkpoints: what is checked is the batching, the seeds and the bookkeeping, not
the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_tiny_hf

torch = pytest.importorskip("torch")

from llmpipe.evaluation import hf_backend as hb  # noqa: E402
from llmpipe.evaluation.records import Sampling  # noqa: E402

PROMPTS = [
    "the cat sat on the mat",
    "a dog",
    "the dog ran and the cat sat",
    "a cat and a dog sat on a mat and ran",
    "the mat",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_hf(tmp_path_factory.mktemp("hfb") / "tiny")
    settings = hb.HFSettings.from_config({"device": "cpu"}, threads=1)
    return hb.load(str(Path(folder)), settings)


def run(tiny, prompts, sampling, batch_size):
    model, tokenizer, device, _ = tiny
    return hb.generate(model, tokenizer, device, list(prompts), sampling, batch_size)


def test_batched_greedy_is_what_plain_generate_gives_one_prompt_at_a_time(tiny):
    model, tokenizer, _, _ = tiny
    sampling = Sampling(max_new_tokens=8, temperature=0.0)
    results, batches = run(tiny, enumerate(PROMPTS), sampling, batch_size=4)
    assert [b.rows for b in batches] == [4, 1]
    for r in results:
        ids = torch.tensor([hb.tokenize(tokenizer, r.prompt)])
        plain = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=8, pad_token_id=hb.pad_id(model, tokenizer),
        )[0, ids.shape[1]:].tolist()  # fmt: skip
        assert r.token_ids == plain[: len(r.token_ids)], r.prompt
        assert r.stop == ("eos" if len(r.token_ids) < 8 else "length")
        assert r.prompt_tokens == ids.shape[1]


def test_a_prompts_sample_does_not_depend_on_its_batch(tiny):
    """Per-prompt seeds: the same prompt index samples the same tokens alone, in a batch, and
    with its neighbours reordered; another seed samples something else."""
    sampling = Sampling(max_new_tokens=10, temperature=1.5, top_k=8, top_p=0.95, seed=7)
    together, _ = run(tiny, enumerate(PROMPTS), sampling, batch_size=5)
    alone, _ = run(tiny, enumerate(PROMPTS), sampling, batch_size=1)
    shuffled, _ = run(tiny, reversed(list(enumerate(PROMPTS))), sampling, batch_size=2)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.token_ids for r in together] == [r.token_ids for r in shuffled]
    other, _ = run(tiny, enumerate(PROMPTS), Sampling(**{**sampling.as_dict(), "seed": 8}), 5)
    assert [r.token_ids for r in other] != [r.token_ids for r in together]


def test_top_k_one_samples_the_greedy_tokens(tiny):
    greedy, _ = run(tiny, enumerate(PROMPTS), Sampling(max_new_tokens=6), 5)
    sampled, _ = run(tiny, enumerate(PROMPTS), Sampling(max_new_tokens=6, temperature=0.8,
                                                          top_k=1), 5)  # fmt: skip
    assert [r.token_ids for r in sampled] == [r.token_ids for r in greedy]


def test_prefill_and_decode_are_timed_apart(tiny):
    sampling = Sampling(max_new_tokens=6, temperature=0.0)
    results, (batch,) = run(tiny, enumerate(PROMPTS), sampling, batch_size=8)
    longest = max(len(r.token_ids) for r in results)
    assert batch.steps == longest - 1 and batch.rows == len(PROMPTS)
    assert batch.prefill_s > 0 and batch.decode_s > 0
    assert sum(r.prefill_s for r in results) == pytest.approx(batch.prefill_s)
    # A row's decode time runs to its own last token (per sequence): within the batch's, and
    # longer for a row that generated more.
    assert all(0 < r.decode_s <= batch.decode_s for r in results if r.decode_tokens)
    by_length = sorted(results, key=lambda r: len(r.token_ids))
    assert [r.decode_s for r in by_length] == sorted(r.decode_s for r in by_length)


def test_cuda_generation_uses_a_static_cache_and_compiles_only_when_asked(tiny):
    model, tokenizer, _, _ = tiny
    cuda = hb.generation_kwargs(model, tokenizer, Sampling(), "cuda", compile=False)
    assert cuda["generation_config"].cache_implementation == "static"
    assert cuda["generation_config"].disable_compile is True
    on = hb.generation_kwargs(model, tokenizer, Sampling(), "cuda", compile=True)
    assert on["generation_config"].disable_compile is False
    cpu = hb.generation_kwargs(model, tokenizer, Sampling(), "cpu", compile=False)
    assert cpu["generation_config"].cache_implementation is None


def test_one_gpu_or_the_cpu_needs_no_device_map():
    assert hb.placement("cpu", 2) == {}
    assert hb.placement("cuda", 1) == {}


def test_the_backend_interface_generates_and_scores_as_the_functions_do(tmp_path_factory, tiny):
    """``HFBackend.load`` gives a ``backend.Model`` whose generate and chunk logits are those
    of the module's functions on the same folder."""
    import numpy as np

    from llmpipe.evaluation import backend

    folder = make_tiny_hf(tmp_path_factory.mktemp("hfi") / "tiny")
    model = backend.get("transformers").load(folder, {"device": "cpu", "batch_size": 4}, 1)
    try:
        assert isinstance(model, backend.Model)
        assert model.device == "cpu" and model.kv_elem_bytes == 4.0 and model.n_vocab == 12
        sampling = Sampling(max_new_tokens=5, temperature=0.0)
        generation = model.generate(list(enumerate(PROMPTS)), sampling)
        results, batches = run(tiny, enumerate(PROMPTS), sampling, batch_size=4)
        assert [r.token_ids for r in generation.results] == [r.token_ids for r in results]
        assert generation.decode_steps == sum(b.steps for b in batches)
        assert [b["rows"] for b in generation.extra["batches"]] == [4, 1]
        settings = model.settings()
        assert settings["resolved_device"] == "cpu" and settings["gpus"] == 0
        chunk = np.asarray(model.tokenize("the cat sat on the mat and the dog ran"))
        logits = model.chunk_logits(chunk, 2)
        assert logits.shape == (len(chunk) - 3, model.n_vocab) and logits.dtype == np.float32
        assert model.gb_disk_to_device() > 0 and model.peak_vram_mb() is None
        assert model.tune_threads(4) == {"threads_used": 1, "step_s": {}}  # one thread: no tuning
    finally:
        model.close()
