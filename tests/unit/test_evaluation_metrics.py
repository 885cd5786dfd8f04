"""Unit tests of the evaluation's metric, figure, farm and probe code, on hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmpipe.estimate import ModelShape
from llmpipe.evaluation import bandwidth, farm, figures, metrics
from llmpipe.evaluation.records import PromptResult, Sampling

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


# ---- chunking --------------------------------------------------------------------------------


def test_chunks_are_non_overlapping_and_drop_the_tail():
    chunks = metrics.make_chunks(range(11), n_ctx=4)
    assert chunks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert metrics.make_chunks(range(11), n_ctx=4, max_chunks=1).tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="fewer than one chunk"):
        metrics.make_chunks(range(3), n_ctx=4)


def test_second_half_of_each_chunk_is_scored():
    # llama-perplexity: logits at positions n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 ..
    assert metrics.first_scored(512) == 256 and metrics.scored_per_chunk(512) == 255
    assert metrics.first_scored(5) == 2 and metrics.scored_per_chunk(5) == 2
    assert metrics.chunk_targets(np.array([10, 11, 12, 13, 14])).tolist() == [13, 14]


def test_bos_replaces_the_first_token_only_when_the_model_adds_one():
    chunk = np.array([7, 8, 9, 10])
    assert metrics.model_input(chunk, None).tolist() == [7, 8, 9, 10]
    assert metrics.model_input(chunk, 1).tolist() == [1, 8, 9, 10]
    assert chunk.tolist() == [7, 8, 9, 10]  # the stored tokens are untouched


# ---- per-token quantities --------------------------------------------------------------------


def test_token_nll_by_hand():
    # softmax([0, 0]) = [1/2, 1/2]; softmax([0, ln 3]) = [1/4, 3/4]
    logits = np.array([[0.0, 0.0], [0.0, LN3], [0.0, LN3]], dtype=np.float32)
    nll = metrics.token_nll(logits, np.array([0, 1, 0]))
    assert nll == pytest.approx([LN2, math.log(4 / 3), LN4], abs=1e-6)


def test_encoded_log_probs_by_hand():
    # logits [0, ln 3]: log-probs [ln 1/4, ln 3/4]; the codes span the 16-nat window (here
    # ln 3 wide): 0 and 65535; the header holds scale = ln3 / 65535 and min_log_prob = -ln 4.
    rec = metrics.encode_logprobs(np.array([[0.0, LN3]], dtype=np.float32))
    assert rec.shape == (1, metrics.record_width(2)) == (1, 6)
    scale, min_log_prob = rec[0, :4].copy().view("<f4")
    assert scale == pytest.approx(LN3 / 65535, rel=1e-6)
    assert min_log_prob == pytest.approx(-LN4, abs=1e-6)
    assert rec[0, 4:6].tolist() == [0, 65535]
    decoded = metrics.decode_logprobs(rec, 2)
    assert decoded[0] == pytest.approx([math.log(1 / 4), math.log(3 / 4)], abs=1e-6)


def test_encoding_is_accurate_within_half_a_step_and_floors_at_16_nats():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 101)) * 4).astype(np.float32)
    logits[:, 0] = logits.max(axis=1) - 25  # far below the window
    exact = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
    decoded = metrics.decode_logprobs(metrics.encode_logprobs(logits), 101)
    window = exact > exact.max(axis=1, keepdims=True) - 16
    assert np.abs(decoded - exact)[window].max() < 16 / 65535
    top = exact.max(axis=1)
    assert np.all(decoded[:, 0] <= top - 16 + 1e-4)  # below the window: clamped to its floor


def test_equal_logits_give_scale_zero_and_uniform_log_probs():
    rec = metrics.encode_logprobs(np.zeros((1, 4), dtype=np.float32))
    assert rec[0, :4].copy().view("<f4").tolist() == [0.0, pytest.approx(-LN4)]
    assert metrics.decode_logprobs(rec, 4)[0] == pytest.approx([-LN4] * 4)


def test_kl_divergence_same_top_and_p_diff_by_hand():
    # base p = [1/2, 1/2], model q = [1/4, 3/4]:
    # KLD(p||q) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3); arg-maxes differ (base: first max).
    base = metrics.encode_logprobs(np.array([[0.0, 0.0]], dtype=np.float32))
    model = np.array([[0.0, LN3]], dtype=np.float32)
    out = metrics.compare_to_base(model, base, np.array([0]))
    assert out["kld"][0] == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert out["nll"][0] == pytest.approx(LN4) and out["nll_base"][0] == pytest.approx(LN2)
    assert out["same_top"].tolist() == [False]
    assert out["p_diff"][0] == pytest.approx(0.25 - 0.5)


def test_kl_divergence_ignores_base_tokens_below_minus_16_nats():
    # llama.cpp sums only over base tokens with log p > -16: here token 1 (log p ~ -20).
    base = metrics.encode_logprobs(np.array([[0.0, -20.0]], dtype=np.float32))
    model = np.array([[0.0, 0.0]], dtype=np.float32)
    out = metrics.compare_to_base(model, base, np.array([0]))
    assert out["kld"][0] == pytest.approx(LN2, abs=1e-6)  # 1 * (0 - ln 1/2)
    assert out["same_top"].tolist() == [True]


def test_a_model_against_its_own_log_probs_has_zero_kld():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((7, 50)) * 3).astype(np.float32)
    out = metrics.compare_to_base(logits, metrics.encode_logprobs(logits), np.arange(7))
    # Only the base's uint16 rounding remains: |sum p delta| <= max |delta| = half a step.
    assert np.abs(out["kld"]).max() <= 16 / 65535 / 2
    assert out["same_top"].all()
    assert out["nll"] == pytest.approx(out["nll_base"], abs=16 / 65535 / 2)


# ---- statistics ------------------------------------------------------------------------------


def test_mean_and_uncertainty_as_llama_cpp():
    # 0..10: mean 5, E[x^2] - mean^2 = 35 - 25 = 10, uncertainty sqrt(10 / 10) = 1
    assert metrics.mean_and_uncertainty(np.arange(11)) == (5.0, pytest.approx(1.0))
    assert metrics.mean_and_uncertainty([1.0, 3.0]) == (2.0, 0.0)  # <= 10 values: none


def test_percentile_and_median():
    assert metrics.percentile([4, 1, 3, 2], 0.5) == 2.5
    assert metrics.percentile(np.arange(101), 0.99) == pytest.approx(99.0)
    assert metrics.percentile([5, 1], 0.0) == 1 and metrics.percentile([5, 1], 1.0) == 5
    assert metrics.median([3, 1, 2]) == 2 and metrics.median([4, 1, 3, 2]) == 2.5


def test_quality_summary_by_hand():
    nll_base = np.linspace(1.0, 3.0, 21)
    per_token = {
        "nll": nll_base + 0.1,  # every token 0.1 nats worse: PPL ratio e^0.1, fully correlated
        "nll_base": nll_base,
        "kld": np.arange(21) / 100,
        "same_top": np.arange(21) % 4 != 0,  # 15 of 21
        "p_diff": np.full(21, 0.02),
    }
    s = metrics.quality_summary(per_token)
    assert s["ppl"] == pytest.approx(math.exp(2.1)) and s["ppl_base"] == pytest.approx(math.exp(2))
    assert s["ppl_ratio"] == pytest.approx(math.exp(0.1))
    assert s["ln_ppl_ratio_unc"] == pytest.approx(0.0, abs=1e-6)  # perfectly correlated
    assert s["kld_mean"] == pytest.approx(0.1)
    assert s["kld_median"] == pytest.approx(0.1)
    assert s["kld_p99"] == pytest.approx(0.198)  # 0.99 * 20 = 19.8 -> between 0.19 and 0.20
    assert s["kld_max"] == pytest.approx(0.2)
    assert s["same_top_pct"] == pytest.approx(100 * 15 / 21)
    assert s["p_diff_rms_pct"] == pytest.approx(2.0)
    assert s["scored_tokens"] == 21


def test_identity_summary_is_the_reference_against_itself():
    s = metrics.identity_summary(np.full(20, LN2))
    assert s["ppl"] == pytest.approx(2.0) and s["ppl_ratio"] == 1.0
    assert s["kld_mean"] == 0.0 and s["same_top_pct"] == 100.0


# ---- base file -------------------------------------------------------------------------------


def test_base_file_round_trip_in_llama_perplexity_layout(tmp_path):
    rng = np.random.default_rng(2)
    n_ctx, n_vocab = 8, 5  # odd vocabulary: records are padded to an even width
    chunks = rng.integers(0, n_vocab, (2, n_ctx)).astype(np.int32)
    rows = [rng.standard_normal((3, n_vocab)).astype(np.float32) for _ in range(2)]
    path = tmp_path / "base.kld"
    writer = metrics.BaseFileWriter(path, n_vocab, chunks)
    for logits in rows:
        writer.write_chunk(logits)
    writer.close()
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    assert np.frombuffer(raw[8:12], "<u4")[0] == n_ctx
    assert np.frombuffer(raw[12:20], "<i4").tolist() == [n_vocab, 2]
    assert len(raw) == 20 + 4 * chunks.size + 2 * 2 * 3 * metrics.record_width(n_vocab)
    base = metrics.read_base_file(path)
    assert (base.n_ctx, base.n_vocab, base.n_chunk) == (n_ctx, n_vocab, 2)
    assert np.array_equal(base.chunks, chunks)
    for k, logits in enumerate(rows):
        assert np.array_equal(base.records[k], metrics.encode_logprobs(logits))


def test_base_file_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "base.kld"
    writer = metrics.BaseFileWriter(path, 4, np.zeros((1, 4), dtype=np.int32))
    writer.write_chunk(np.zeros((1, 4), dtype=np.float32))
    writer.close()
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        metrics.read_base_file(path)


# ---- figures ---------------------------------------------------------------------------------

TINY = {
    "model_type": "llama",
    "hidden_size": 4,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "vocab_size": 10,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def test_flops_by_hand():
    shape = ModelShape.from_config(TINY)
    # linears q16 + k8 + v8 + o16 + gate32 + up32 + down32 = 144, norms 3 x 4, embedding 40
    assert shape.matmul_params == 196
    # prompt of 3: 2 x (196 - 40) x 3 + 2 x 40 x 1 (one logit row) + 4 x 1 x 4 x 6 pairs
    assert figures.forward_flops(shape, 3) == 936 + 80 + 96
    # + 2 decode steps at 4 and 5 keys: 2 x 196 x 2 + 4 x 4 x 9
    assert figures.generation_flops(shape, 3, 3) == 1112 + 784 + 144
    assert figures.generation_flops(shape, 3, 1) == 1112  # the first token comes from prefill


def test_decode_bytes_by_hand():
    shape = ModelShape.from_config(TINY)
    assert figures.kv_bytes_per_position(shape, 2.0) == 2 * 1 * 2 * 2  # K and V, f16
    assert figures.decode_positions_read(3, 3) == 4 + 5
    assert figures.decode_kv_bytes(shape, 3, 3, 2.0) == 72
    tied = figures.WeightBytes(total=1000, embedding=400, tied=True)
    untied = figures.WeightBytes(total=1400, embedding=400, tied=False)
    assert tied.read_per_step == 1000 and untied.read_per_step == 1000


def test_rates_by_hand():
    r = figures.rates(decode_bytes=1e9, decode_tokens=10, decode_s=2.0, peak_gb_s=1.0)
    assert r["bytes_per_token"] == 1e8 and r["achieved_gb_s"] == 0.5
    assert r["roofline_pct"] == 50.0 and r["roofline_tok_s"] == 10.0
    none = figures.rates(decode_bytes=0, decode_tokens=0, decode_s=0, peak_gb_s=None)
    assert none["achieved_gb_s"] is None and none["roofline_pct"] is None


def test_gguf_weight_bytes_tells_tied_from_untied(tmp_path):
    import gguf

    def write(path, names):
        w = gguf.GGUFWriter(str(path), "llama")
        for name in names:
            w.add_tensor(name, np.zeros((4, 10), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "tied.gguf", ["token_embd.weight", "blk.0.ffn_up.weight"])
    write(tmp_path / "untied.gguf", ["token_embd.weight", "blk.0.ffn_up.weight", "output.weight"])
    tied = figures.gguf_weight_bytes(tmp_path / "tied.gguf")
    untied = figures.gguf_weight_bytes(tmp_path / "untied.gguf")
    assert (tied.total, tied.embedding, tied.tied) == (320, 160, True)
    assert (untied.total, untied.tied, untied.read_per_step) == (480, False, 320)


# ---- farm ------------------------------------------------------------------------------------


def test_split_covers_every_prompt_once_in_order():
    assert [list(b) for b in farm.split(10, 3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(b) for b in farm.split(2, 3)] == [1, 1, 0]
    with pytest.raises(ValueError):
        farm.split(3, 0)


def test_write_shards(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n\nb\nc\\nd\n")
    outs = [tmp_path / f"{k}-of-2.json" for k in (1, 2)]
    farm.write_shards(prompts, outs)
    assert farm.read_shard(outs[0]) == [(0, "a"), (1, "b")]
    assert farm.read_shard(outs[1]) == [(2, "c\nd")]


def _shard(started, finished, prompts, **kw):
    base = {
        "started_at": started,
        "finished_at": finished,
        "prompts": prompts,
        "load_s": 1.0,
        "load_source": "ram_disk",
        "peak_rss_mb": 100.0,
        "peak_vram_mb": None,
        "peak_bandwidth_gb_s": 10.0,
        "achieved_gb_s_max": 2.0,
        "device": "cpu",
        "host": "h",
    }
    return base | kw


def test_gather_sums_totals_and_uses_the_farms_wall_time():
    a = _shard(
        100.0,
        110.0,
        [{"index": 1}],
        generated_tokens=30,
        decode_tokens=28,
        prompt_tokens=5,
        prefill_s=1.0,
        decode_s=4.0,
        sequence_decode_s=16.0,  # four prompts shared each step
        decode_sequences=4,
        decode_bytes=4e9,
        flops=10.0,
    )
    b = _shard(102.0, 130.0, [{"index": 0}], generated_tokens=90, decode_tokens=88,
               prompt_tokens=15, prefill_s=1.0, decode_s=7.0, sequence_decode_s=7.0,
               decode_bytes=7e9, flops=20.0,
               peak_rss_mb=300.0, load_s=3.0)  # fmt: skip
    g = farm.gather([a, b])
    assert g["generated_tokens"] == 120 and g["prompt_tokens"] == 20 and g["flops"] == 30.0
    assert g["wall_s"] == 30.0  # first start (100) to last end (130), shards overlap
    assert g["tokens_per_min"] == pytest.approx(120 / 30 * 60)
    assert g["prefill_tok_s"] == 10.0
    # aggregate: every decode token over the steps' time; per sequence: over each prompt's own
    assert g["decode_tok_s_aggregate"] == pytest.approx(116 / 11)
    assert g["decode_tok_s_per_sequence"] == pytest.approx(116 / 23)
    assert g["decode_sequences"] == 4
    assert g["achieved_gb_s"] == pytest.approx(1.0) and g["roofline_pct"] == pytest.approx(10)
    assert g["load_s"] == 2.0 and g["peak_rss_mb"] == 300.0
    assert [p["index"] for p in g["prompts"]] == [0, 1]
    with pytest.raises(ValueError, match="two shards"):
        farm.gather([a, a])


# ---- bandwidth, sampling ---------------------------------------------------------------------


def test_gpu_peak_bandwidth_from_the_table():
    table = {"V100": 900, "A100": 1555, "A100-SXM4-80GB": 2039}
    assert bandwidth.table_bandwidth("Tesla V100-SXM2-32GB", table) == 900
    assert bandwidth.table_bandwidth("GRID V100D-32Q", table) == 900
    assert bandwidth.table_bandwidth("NVIDIA A100-SXM4-80GB", table) == 2039  # longest key
    assert bandwidth.table_bandwidth("NVIDIA A100-PCIE-40GB", table) == 1555
    assert bandwidth.table_bandwidth("Quadro P1000", table) is None


def test_probe_measures_and_is_cached_per_host(tmp_path, monkeypatch):
    record = bandwidth.probe(threads=1, size_mb=64, repetitions=2)
    assert record["gb_s"] > 0 and record["threads"] == 1 and len(record["passes_gb_s"]) == 2
    calls = []
    monkeypatch.setattr(bandwidth, "probe", lambda *a, **k: calls.append(a) or dict(record))
    other = tmp_path / "probe.json"
    other.write_text(json.dumps({**record, "host": "elsewhere"}))
    first = bandwidth.host_bandwidth(other, tmp_path / "cache", threads=1)
    second = bandwidth.host_bandwidth(other, tmp_path / "cache", threads=1)
    assert len(calls) == 1 and first["gb_s"] == second["gb_s"]  # measured once on this host
    here = tmp_path / "here.json"
    here.write_text(json.dumps({**record, "gb_s": 123.0}))
    assert bandwidth.host_bandwidth(here, tmp_path / "cache", threads=1)["gb_s"] == 123.0


def test_sampling_seeds_per_prompt_and_counts():
    s = Sampling.from_config({"temperature": 0.7, "seed": 10, "unknown": 1})
    assert not s.greedy and s.prompt_seed(3) == 13
    r = PromptResult(index=0, prompt="p", prompt_tokens=4, token_ids=[5, 6, 2], stop="eos")
    assert r.generated_tokens == 3 and r.decode_tokens == 2
    assert r.as_dict()["generated_tokens"] == 3


def test_one_thread_replaces_the_configured_count_only_when_clearly_faster():
    from llmpipe.evaluation.records import choose_threads

    assert choose_threads({2: 0.100, 1: 0.095}, 2) == 2  # within the noise: keep 2
    assert choose_threads({2: 0.100, 1: 0.080}, 2) == 1  # 20 % faster: a core is taken
    assert choose_threads({4: 0.050}, 4) == 4
