"""The transformers backend's decoders: the packed CPU decoder against the model's own forward.

Small random-init Llama and Mistral models (built in memory, seconds) cover what the real
checkpoints on the cluster have: grouped-query attention, biases, an untied output layer,
rotary scaling, a sliding window; SmolLM2 (the default model) checks whole generations.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmpipe.errors import ConfigError  # noqa: E402
from llmpipe.evaluation import hf_backend as hb  # noqa: E402
from llmpipe.evaluation import panel_gemm  # noqa: E402
from llmpipe.evaluation.decoders import (  # noqa: E402
    PACKED_TOLERANCE,
    HFDecoder,
    OneDNNMatmul,
    PackedLlamaDecoder,
    make_decoder,
    packed_unsupported,
)
from llmpipe.evaluation.records import Sampling  # noqa: E402

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
VARIANTS = {
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-bias-untied": (
        "llama",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    ),
    "llama3-rope-scaling": (
        "llama",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "mistral-window": ("mistral", dict(sliding_window=128, tie_word_embeddings=False)),
}


def tiny_model(kind: str, extra: dict, seed: int = 0):
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "gpt2": transformers.GPT2Config,
    }[kind]
    settings = dict(SMALL, **extra) if kind != "gpt2" else extra
    config = config_class(**settings)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases start at zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model.eval()


def padded_batch(vocab: int, lengths: list[int]):
    width = max(lengths)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def relative_error(got, expected) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def matmul_for(name: str, rows: int):
    """The packed decoder's matmul by name (the test is skipped where the kernel cannot run)."""
    if name == "oneDNN":
        return OneDNNMatmul(rows)
    kernel, why = panel_gemm.load()
    if kernel is None:
        pytest.skip(f"panel_gemm cannot run here: {why}")
    return kernel


def run_both(
    kind: str, extra: dict, lengths: list[int], steps: int, drop_at: int | None, matmul: str
):
    """The same prompt pass, decode steps and dropped rows through both decoders; the
    relative logit error of every call."""
    reference_model = tiny_model(kind, extra)
    packed_model = tiny_model(kind, extra)
    ids, mask, positions = padded_batch(reference_model.config.vocab_size, lengths)
    capacity = ids.shape[1] + steps
    errors = []
    with torch.inference_mode():
        reference = HFDecoder(reference_model)
        packed = PackedLlamaDecoder(packed_model, len(lengths), matmul_for(matmul, len(lengths)))
        expected = reference.start(ids, mask, positions, capacity)
        got = packed.start(ids, mask, positions, capacity)
        errors.append(relative_error(got, expected))
        pos = positions[:, -1]
        for step in range(steps):
            tokens = expected.argmax(-1)
            if drop_at is not None and step == drop_at:
                keep = torch.tensor([r for r in range(len(tokens)) if r != 1])
                reference.keep(keep)
                packed.keep(keep)
                tokens, pos = tokens[keep], pos[keep]
            pos = pos + 1
            expected = reference.step(tokens, pos)
            got = packed.step(tokens, pos)
            errors.append(relative_error(got, expected))
    return errors


@pytest.mark.parametrize("matmul", ["oneDNN", "panel_gemm"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_decoder_matches_the_models_forward(name, matmul):
    """Left-padded prompts of different lengths, decode steps, a row dropped half-way: every
    call's logits agree with transformers' forward to fp32 rounding, with either matmul."""
    kind, extra = VARIANTS[name]
    errors = run_both(kind, extra, lengths=[3, 7, 5], steps=6, drop_at=3, matmul=matmul)
    assert max(errors) < PACKED_TOLERANCE, errors


def test_packed_decoder_takes_the_linear_weights_over():
    """Packed copies replace the model's linear weights (memory does not double)."""
    model = tiny_model("llama", dict(tie_word_embeddings=False))
    PackedLlamaDecoder(model, rows_hint=2)
    layer = model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.mlp.down_proj, model.lm_head):
        assert linear.weight.numel() == 0
    assert model.model.embed_tokens.weight.numel() > 0  # still the input embedding


def test_make_decoder_says_why_it_falls_back():
    gpt2 = tiny_model("gpt2", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=128))
    decoder, note = make_decoder(gpt2, "cpu", "float32", rows=2)
    assert isinstance(decoder, HFDecoder) and "model_type 'gpt2'" in note
    llama = tiny_model("llama", {})
    assert "float32 only" in packed_unsupported(llama, "cpu", "float16")
    assert "float32 only" in packed_unsupported(llama, "cuda", "float32")
    decoder, note = make_decoder(llama, "cpu", "float32", rows=2, packed=False)
    assert isinstance(decoder, HFDecoder) and "cpu_packed_decode" in note
    decoder, note = make_decoder(llama, "cpu", "float32", rows=2)
    assert isinstance(decoder, PackedLlamaDecoder) and "relative logit error" in note
    assert decoder.matmul.name in note


@pytest.mark.fault(
    "a Mistral sliding window shorter than prompt + new tokens (packed CPU decoder)",
    "exceed the model's sliding window (8), which the packed decoder does not implement",
)
def test_a_window_shorter_than_the_batch_is_refused():
    model = tiny_model("mistral", dict(sliding_window=8))
    ids, mask, positions = padded_batch(model.config.vocab_size, [4, 6])
    decoder = PackedLlamaDecoder(model, rows_hint=2)
    with pytest.raises(ConfigError, match=r"sliding window \(8\).*cpu_packed_decode: false"):
        decoder.start(ids, mask, positions, capacity=12)


def test_top_k_draws_what_transformers_warpers_and_a_full_draw_draw():
    """The top-k fast path (softmax over the k best logits) picks exactly the tokens that
    transformers' temperature and top-k warpers followed by a draw over the vocabulary pick."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    sampling = Sampling(temperature=0.7, top_k=20, seed=3)
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 4
    fast, slow = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        got = hb._next_tokens(logits, None, sampling, None, fast)
        scores = TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
        assert got.tolist() == hb._sample(scores, slow).tolist()


def test_smollm2_generates_the_same_tokens_through_both_decoders(smollm2_hf):
    """The default model, greedy, 10 prompts in one batch: the packed decoder and transformers'
    forward produce the same tokens."""
    from llmpipe.config import read_prompts

    prompts = list(enumerate(read_prompts("config/prompts.txt")))
    sampling = Sampling(max_new_tokens=12, temperature=0.0)
    tokens = {}
    for packed in (False, True):
        settings = hb.HFSettings.from_config({"device": "cpu"}, threads=2)
        model, tokenizer, device, dtype = hb.load(str(smollm2_hf), settings)
        decoder, note = make_decoder(model, device, dtype, len(prompts), packed)
        results, batches = hb.generate(
            decoder, model, tokenizer, device, prompts, sampling, batch_size=16
        )
        tokens[packed] = [r.token_ids for r in results]
        assert len(batches) == 1
    assert tokens[True] == tokens[False]
