"""The hardware figures of an evaluation, from the model's shape and what the run measured.

Definitions (every figure in the eval JSON is one of these):

- **FLOPs** of a forward pass over ``n`` new tokens after ``past`` cached ones, of which ``k``
  produce logits: ``2 * body * n + 2 * vocab * hidden * k + 4 * layers * q_dim * pairs``, where
  ``body`` = the multiplied parameters except the output matrix (``ModelShape.matmul_params -
  vocab * hidden``), and ``pairs = n * past + n (n + 1) / 2`` query-key pairs (QK^T and AV:
  2 FLOPs per multiply-add, ``q_dim`` wide, both). A prompt is one pass with ``k = 1``; every
  generated token after the first is one pass of ``n = 1``. Only useful work is counted
  (padding rows of a batch are not).
- **Weights read per decode step** = all weight bytes as loaded, except an untied input
  embedding, of which a step reads one row (a tied one is read in full by the output matmul).
- **KV cache read per decode token** = ``2 * layers * kv_dim * bytes_per_element`` per cached
  position (keys and values), for every position the new token attends to.
- **Decode bytes** = steps x weights read + the KV cache read by every decode token. A batched
  step (transformers) reads the weights once for the whole batch.
- ``bytes_per_token`` = decode bytes / decode tokens; ``achieved_gb_s`` = decode bytes / decode
  seconds; ``roofline_pct`` = 100 x achieved / peak bandwidth; ``roofline_tok_s`` = peak
  bandwidth / bytes per token (the most tokens/s the memory system allows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmpipe.estimate import ModelShape

GB = 1e9

# Bytes per element of llama.cpp KV-cache types (ggml block sizes: Q8_0 34 B / 32, ...).
KV_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
TORCH_DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}


def model_shape(hf_dir_or_config: str | os.PathLike) -> ModelShape:
    """The model's shape from its Hugging Face config.json (folder or file)."""
    return ModelShape.from_config(Path(hf_dir_or_config))


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the loaded weights: all of them, and the input embedding table."""

    total: int
    embedding: int
    tied: bool

    @property
    def read_per_step(self) -> int:
        """Weight bytes one forward step reads (an untied embedding contributes one row only)."""
        return self.total if self.tied else self.total - self.embedding

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "embedding": self.embedding,
            "tied": self.tied,
            "read_per_step": self.read_per_step,
        }


def gguf_weight_bytes(path: str | os.PathLike) -> WeightBytes:
    """From a GGUF's tensor table: total tensor bytes, ``token_embd`` bytes, tied or not."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    return WeightBytes(
        total=sum(sizes.values()),
        embedding=sizes.get("token_embd.weight", 0),
        tied="output.weight" not in sizes,
    )


def torch_weight_bytes(model) -> WeightBytes:
    """From a loaded transformers model (bytes in memory, in the dtype it runs in)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:  # tied weights appear once
            seen.add(id(param))
            total += param.numel() * param.element_size()
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return WeightBytes(total, emb.numel() * emb.element_size(), tied)


def kv_bytes_per_position(shape: ModelShape, bytes_per_element: float) -> float:
    """Keys and values of one cached position, all layers."""
    return 2 * shape.n_layers * shape.kv_dim * bytes_per_element


def attention_pairs(n_new: int, past: int) -> int:
    """Query-key pairs of ``n_new`` causal tokens after ``past`` cached ones."""
    return n_new * past + n_new * (n_new + 1) // 2


def forward_flops(shape: ModelShape, n_new: int, past: int = 0, n_logits: int = 1) -> float:
    """FLOPs of one forward pass (see the module docstring)."""
    out_matmul = shape.vocab * shape.hidden
    body = shape.matmul_params - out_matmul
    attention = 4 * shape.n_layers * shape.q_dim * attention_pairs(n_new, past)
    return 2.0 * body * n_new + 2.0 * out_matmul * n_logits + attention


def generation_flops(shape: ModelShape, prompt_tokens: int, generated_tokens: int) -> float:
    """One prompt: its prefill pass, then one pass per generated token after the first."""
    if generated_tokens <= 0:
        return forward_flops(shape, prompt_tokens) if prompt_tokens else 0.0
    steps = generated_tokens - 1
    decode = 2.0 * shape.matmul_params * steps
    decode += 4 * shape.n_layers * shape.q_dim * (steps * prompt_tokens + steps * (steps + 1) // 2)
    return forward_flops(shape, prompt_tokens) + decode


def decode_positions_read(prompt_tokens: int, generated_tokens: int) -> int:
    """Cached positions the decode steps of one prompt attend to, summed over the steps."""
    steps = max(generated_tokens - 1, 0)
    return steps * prompt_tokens + steps * (steps + 1) // 2


def decode_kv_bytes(
    shape: ModelShape, prompt_tokens: int, generated_tokens: int, bytes_per_element: float
) -> float:
    return kv_bytes_per_position(shape, bytes_per_element) * decode_positions_read(
        prompt_tokens, generated_tokens
    )


def rates(
    *,
    decode_bytes: float,
    decode_tokens: int,
    decode_s: float,
    peak_gb_s: float | None,
) -> dict:
    """bytes_per_token, achieved_gb_s, roofline_pct, roofline_tok_s from the totals."""
    bytes_per_token = decode_bytes / decode_tokens if decode_tokens else None
    achieved = decode_bytes / decode_s / GB if decode_s > 0 and decode_tokens else None
    roofline = 100 * achieved / peak_gb_s if achieved is not None and peak_gb_s else None
    roofline_tok_s = peak_gb_s * GB / bytes_per_token if bytes_per_token and peak_gb_s else None
    return {
        "bytes_per_token": bytes_per_token,
        "achieved_gb_s": achieved,
        "peak_bandwidth_gb_s": peak_gb_s,
        "roofline_pct": roofline,
        "roofline_tok_s": roofline_tok_s,
    }
