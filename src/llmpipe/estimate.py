"""Predict peak memory, runtime and GPU count for every workflow step from a model's config.json.

The numbers feed the rules' ``mem_mb``, ``runtime`` and GPU count, so the Slurm profile asks for
what a job needs: too little and the job is killed (OOM or time limit), too much and it queues
for longer than it should. The model is first-order on purpose: bytes are counted exactly where
they can be (weights, KV cache, optimizer state), activations and runtimes come from documented
formulas with tunable efficiency and safety factors (``Hardware``, ``Assumptions``).

Units: "MB" in this module is MiB (2**20 bytes), which is what Slurm's ``--mem`` counts; GB in
the CLI table is GiB. Runtimes are wall-clock minutes for a job, including start-up.

This module is imported by the Snakemake planner: keep it to the standard library (no torch,
no transformers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmpipe.errors import ConfigError, PipelineError, ResourceError

MIB = 1024**2
GIB = 1024**3


class ModelConfigError(ConfigError, ValueError):
    """A model's config.json is unreadable or lacks a key the estimator needs."""


# --------------------------------------------------------------------------------------------
# Weight formats
# --------------------------------------------------------------------------------------------

# Bits per weight of each format.
#
# Single GGUF tensor types: exact, from the block structs in llama.cpp's ggml-common.h
# (bytes per block * 8 / weights per block; QK_K = 256):
#   Q4_0  {f16 d; u8 qs[16]}                          18 B / 32  = 4.5
#   Q4_1  {f16 d, m; u8 qs[16]}                       20 B / 32  = 5.0
#   Q5_0  {f16 d; u8 qh[4]; u8 qs[16]}                22 B / 32  = 5.5
#   Q5_1  {f16 d, m; u8 qh[4]; u8 qs[16]}             24 B / 32  = 6.0
#   Q8_0  {f16 d; i8 qs[32]}                          34 B / 32  = 8.5
#   Q2_K  {u8 scales[16]; u8 qs[64]; f16 d, dmin}     84 B / 256 = 2.625
#   Q3_K  {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}          110 B / 256 = 3.4375
#   Q4_K  {f16 d, dmin; u8 scales[12]; u8 qs[128]}                 144 B / 256 = 4.5
#   Q5_K  {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}      176 B / 256 = 5.5
#   Q6_K  {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}            210 B / 256 = 6.5625
#   IQ1_S 50 B/256 = 1.5625, IQ1_M 56 B/256 = 1.75, IQ2_XXS 66 B/256 = 2.0625,
#   IQ2_XS 74 B/256 = 2.3125, IQ2_S 82 B/256 = 2.5625, IQ3_XXS 98 B/256 = 3.0625,
#   IQ3_S 110 B/256 = 3.4375, IQ4_NL 18 B/32 = 4.5, IQ4_XS 136 B/256 = 4.25
#
# llama.cpp "file types" that mix tensor types (the _S/_M/_L k-quant recipes, IQ2_M, IQ3_XS,
# IQ3_M) have no single block size. For them the value is the whole-file average that
# llama.cpp's tools/quantize/README.md reports for Llama-2-7B (Q2_K 3.35, Q3_K_S 3.50,
# Q3_K_M 3.91, Q3_K_L 4.27, Q4_K_S 4.58, Q4_K_M 4.84, Q5_K_S 5.52, Q5_K_M 5.68) and, for
# the IQ mixes, the bpw that `llama-quantize --help` prints. These averages include the
# higher-precision output/attn_v/ffn_down tensors, so they are slightly model-dependent.
# Note Q2_K as a *file type* (3.35) is larger than the Q2_K *block* (2.625) for that reason.
# Q2_K_S has no published per-model average: 3.0 is assumed (between block and Q2_K mix).
# Single-type files (Q4_0, Q8_0, Q6_K...) use the block value; llama.cpp may still write the
# output tensor at Q6_K, a difference of well under 1% for these models.
#
# bitsandbytes: int8 (LLM.int8) stores 1 byte per weight plus one fp32 scale per row (~0 bits
# at these widths, ignored); nf4/fp4 store 4 bits plus an absmax per block of 64: fp32 without
# double quantization (+0.5 bit), or an 8-bit absmax with an fp32 scale per 256 absmaxes with
# it (+8/64 + 32/(64*256) = +0.127 bit, the QLoRA paper's number). "nf4" assumes double
# quantization, as QLoRA recipes set bnb_4bit_use_double_quant=True.
_FLOAT_BITS: dict[str, float] = {"f32": 32.0, "f16": 16.0, "bf16": 16.0}
_GGUF_BITS: dict[str, float] = {
    "Q8_0": 8.5,
    "Q6_K": 6.5625,
    "Q5_K_M": 5.68,
    "Q5_K_S": 5.52,
    "Q5_1": 6.0,
    "Q5_0": 5.5,
    "Q4_K_M": 4.84,
    "Q4_K_S": 4.58,
    "Q4_1": 5.0,
    "Q4_0": 4.5,
    "Q3_K_L": 4.27,
    "Q3_K_M": 3.91,
    "Q3_K_S": 3.50,
    "Q2_K": 3.35,
    "Q2_K_S": 3.0,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.25,
    "IQ3_M": 3.66,
    "IQ3_S": 3.4375,
    "IQ3_XS": 3.3,
    "IQ3_XXS": 3.0625,
    "IQ2_M": 2.7,
    "IQ2_S": 2.5625,
    "IQ2_XS": 2.3125,
    "IQ2_XXS": 2.0625,
    "IQ1_M": 1.75,
    "IQ1_S": 1.5625,
}
_BNB_BITS: dict[str, float] = {"int8": 8.0, "nf4": 4.127, "fp4": 4.127, "nf4-nodq": 4.5}

_ALIASES: dict[str, str] = {
    "fp32": "f32",
    "float32": "f32",
    "float": "f32",
    "fp16": "f16",
    "float16": "f16",
    "half": "f16",
    "bfloat16": "bf16",
    "q4_k": "Q4_K_M",
    "q3_k": "Q3_K_M",
    "q5_k": "Q5_K_M",
    "llm.int8": "int8",
    "8bit": "int8",
    "4bit": "nf4",
}

# Formats llama.cpp's official converter can write directly (its --outtype choices).
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "Q8_0")


# A variant quantized with an importance matrix ("Q4_K_M-imat", llmpipe.config.IMATRIX_SUFFIX,
# not imported: this module stays free of the config's yaml) stores exactly its type's bits.
IMATRIX_SUFFIX = "-imat"


def normalize_format(name: str) -> str:
    """Canonical spelling of a dtype or quant type: ``f16``, ``bf16``, ``Q4_K_M``, ``nf4``...
    (a ``-imat`` variant is its type: ``Q4_K_M-imat`` -> ``Q4_K_M``)."""
    key = str(name).strip()
    if key.lower().endswith(IMATRIX_SUFFIX):
        key = key[: -len(IMATRIX_SUFFIX)]
    alias = _ALIASES.get(key.lower())
    if alias is not None:
        return alias
    if key.lower() in _FLOAT_BITS:
        return key.lower()
    if key.lower() in _BNB_BITS:
        return key.lower()
    if key.upper() in _GGUF_BITS:
        return key.upper()
    known = sorted(_FLOAT_BITS) + sorted(_BNB_BITS) + sorted(_GGUF_BITS)
    raise ConfigError(f"unknown dtype/quant type {name!r}: expected one of {', '.join(known)}")


def format_kind(name: str) -> str:
    """``"float"``, ``"gguf"`` (a llama.cpp quant type) or ``"bnb"`` (bitsandbytes)."""
    fmt = normalize_format(name)
    if fmt in _FLOAT_BITS:
        return "float"
    if fmt in _BNB_BITS:
        return "bnb"
    return "gguf"


def bits_per_weight(name: str) -> float:
    """Bits stored per weight for a dtype or quant type (see the table's sources above)."""
    fmt = normalize_format(name)
    for table in (_FLOAT_BITS, _GGUF_BITS, _BNB_BITS):
        if fmt in table:
            return table[fmt]
    raise AssertionError(fmt)  # pragma: no cover - normalize_format only returns known names


def bytes_per_weight(name: str) -> float:
    """Bytes stored per weight: ``bits_per_weight(name) / 8`` (Q8_0 -> 1.0625, f16 -> 2)."""
    return bits_per_weight(name) / 8


def _compute_bytes(fmt: str) -> int:
    """Bytes per activation element when running weights of ``fmt`` (quantized -> f16 math)."""
    return 4 if normalize_format(fmt) == "f32" else 2


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------

_LLAMA_TYPES = {"llama", "mistral"}
_FALCON_TYPES = {"falcon", "RefinedWebModel", "RefinedWeb"}


@dataclass(frozen=True)
class Linear:
    """One weight matrix of a decoder layer (``d_in`` x ``d_out``), by its Hugging Face name."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, read from its Hugging Face ``config.json``.

    ``family`` is ``"llama"`` (Llama/Mistral: RMSNorm, gated SiLU MLP, GQA) or ``"falcon"``
    (LayerNorm with bias, GELU MLP of ``ffn`` width, multi-query or grouped KV).
    """

    name: str
    source: str
    family: str
    model_type: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context: int
    tied_embeddings: bool
    torch_dtype: str | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    norm_bias: bool = False
    parallel_attn: bool = False
    alibi: bool = False
    new_decoder_architecture: bool = False
    notes: tuple[str, ...] = ()

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: str | Path | Mapping[str, Any], name: str | None = None
    ) -> ModelShape:
        """Build from a config.json path or an already-parsed dict.

        Raises ``ModelConfigError`` (a ``ConfigError`` and ``ValueError``) naming the file and
        the key when the file cannot be read or a needed key is missing or not a positive int.
        """
        if isinstance(config, Mapping):
            data: Mapping[str, Any] = config
            source = "<dict>"
            default_name = str(config.get("_name_or_path") or "model").rstrip("/").split("/")[-1]
        else:
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            # A model folder's config.json is named after the folder; a fixture after itself.
            default_name = path.parent.name if path.name == "config.json" else path.stem
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ModelConfigError(f"{source}: model config.json not found") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelConfigError(f"{source}: cannot read model config.json: {exc}") from None
            if not isinstance(data, Mapping):
                raise ModelConfigError(
                    f"{source}: expected a JSON object, got {type(data).__name__}"
                )
        model_type = str(data.get("model_type") or "")
        if model_type in _FALCON_TYPES:
            return _falcon_shape(data, source, name or default_name, model_type)
        return _llama_shape(data, source, name or default_name, model_type)

    # ---- parameter counts --------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        """Width of the query projection: heads x head_dim (equals hidden for these models)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the K and V projections: KV heads x head_dim."""
        return self.n_kv_heads * self.head_dim

    def layer_linears(self) -> tuple[Linear, ...]:
        """The weight matrices of one decoder layer, with Hugging Face module names."""
        h = self.hidden
        if self.family == "falcon":
            ab = self.attention_bias
            return (
                # Fused projection: heads queries, then n_kv keys and n_kv values.
                Linear("query_key_value", h, self.q_dim + 2 * self.kv_dim, ab),
                Linear("dense", self.q_dim, h, ab),
                Linear("dense_h_to_4h", h, self.ffn, ab),
                Linear("dense_4h_to_h", self.ffn, h, ab),
            )
        ab, mb = self.attention_bias, self.mlp_bias
        return (
            Linear("q_proj", h, self.q_dim, ab),
            Linear("k_proj", h, self.kv_dim, ab),
            Linear("v_proj", h, self.kv_dim, ab),
            Linear("o_proj", self.q_dim, h, ab),
            Linear("gate_proj", h, self.ffn, mb),
            Linear("up_proj", h, self.ffn, mb),
            Linear("down_proj", self.ffn, h, mb),
        )

    def param_breakdown(self) -> dict[str, int]:
        """Parameters by group: embedding, attention, mlp, norms (all layers + final), lm_head."""
        linears = self.layer_linears()
        attn_names = {"q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "dense"}
        attention = sum(lin.params for lin in linears if lin.name in attn_names)
        mlp = sum(lin.params for lin in linears if lin.name not in attn_names)
        per_norm = self.hidden * (2 if self.norm_bias else 1)
        return {
            "embedding": self.vocab * self.hidden,
            "attention": self.n_layers * attention,
            "mlp": self.n_layers * mlp,
            "norms": (self.n_layers * self.norms_per_layer + 1) * per_norm,
            "lm_head": 0 if self.tied_embeddings else self.vocab * self.hidden,
        }

    @property
    def n_params(self) -> int:
        """Exact parameter count (a tied lm_head counted once, as transformers does)."""
        return sum(self.param_breakdown().values())

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linear layers: what bitsandbytes quantizes and
        LoRA adapts (embedding, lm_head and norms stay in the compute dtype)."""
        return self.n_layers * sum(lin.d_in * lin.d_out for lin in self.layer_linears())

    @property
    def vector_params(self) -> int:
        """1-D parameters (norm weights/biases, linear biases): GGUF keeps them in f32."""
        biases = sum(lin.d_out for lin in self.layer_linears() if lin.bias)
        return self.param_breakdown()["norms"] + self.n_layers * biases

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token in a forward pass (2 FLOPs each): everything but
        the embedding lookup; a tied lm_head does a matmul with the embedding matrix."""
        bd = self.param_breakdown()
        return self.n_params - bd["embedding"] + (bd["embedding"] if self.tied_embeddings else 0)

    @property
    def largest_tensor_params(self) -> int:
        """Elements of the largest single tensor (the converter and quantizer hold one or two
        of these at a time)."""
        return max(
            [self.vocab * self.hidden] + [lin.d_in * lin.d_out for lin in self.layer_linears()]
        )

    def lora_params(self, rank: int = 16, targets: str = "all-linear") -> int:
        """Trainable LoRA parameters: rank x (d_in + d_out) per adapted matrix per layer.

        ``targets``: ``"all-linear"`` (every decoder linear, the QLoRA paper's choice),
        ``"attention"`` (q/k/v/o, or Falcon's query_key_value + dense) or ``"qv"`` (peft's
        default for Llama: q_proj + v_proj; for Falcon: query_key_value).
        """
        chosen = {
            "all-linear": None,
            "attention": {"q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "dense"},
            "qv": {"q_proj", "v_proj", "query_key_value"},
        }
        if targets not in chosen:
            raise ConfigError(f"lora targets {targets!r}: expected one of {', '.join(chosen)}")
        names = chosen[targets]
        per_layer = sum(
            rank * (lin.d_in + lin.d_out)
            for lin in self.layer_linears()
            if names is None or lin.name in names
        )
        return self.n_layers * per_layer

    # ---- memory ------------------------------------------------------------------------

    def kv_cache_bytes(self, tokens: int, batch: int = 1, bytes_per_elem: float = 2) -> int:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x tokens x batch x bytes."""
        return math.ceil(2 * self.n_layers * self.kv_dim * tokens * batch * bytes_per_elem)

    @property
    def sdpa_math_fallback(self) -> bool:
        """True when transformers' attention falls back to PyTorch's math SDPA, which
        materializes fp32 attention probabilities: Falcon multi-query (7B style) passes keys
        and values with 1 head against all query heads, which the fused kernels reject
        (without ``enable_gqa``). Llama-style GQA repeats K/V first; Falcon's new decoder
        architecture expands them; ALiBi models pass a float mask the fused kernel accepts."""
        return (
            self.family == "falcon"
            and not self.alibi
            and not self.new_decoder_architecture
            and self.n_kv_heads == 1
            and self.n_heads > 1
        )

    def attention_probs_bytes_per_token_layer(self, seq_len: int) -> int:
        """fp32 attention probabilities per token per layer on the math SDPA path (heads x
        context x 4 B; 0 when the fused kernels run). Measured: autograd saves exactly one."""
        return self.n_heads * seq_len * 4 if self.sdpa_math_fallback else 0

    def inference_activation_bytes_per_token(
        self, bytes_per_elem: int = 2, seq_len: int = 0
    ) -> int:
        """Transient activations of the widest point of one layer's forward pass, per token.

        Llama: residual, normed input, attention output and one more hidden-wide buffer (4h)
        while the gated MLP holds gate, up and act(gate)*up (3 ffn). Falcon: 4h + h_to_4h and
        its GELU output (2 ffn). Attention scores are not materialized by SDPA's fused
        kernels; on the math path (``sdpa_math_fallback``) scores and probabilities are, in
        fp32: 2 x heads x ``seq_len`` x 4 B per token.
        """
        mlp = 3 * self.ffn if self.family == "llama" else 2 * self.ffn
        scores = 2 * self.attention_probs_bytes_per_token_layer(seq_len)
        return (4 * self.hidden + mlp) * bytes_per_elem + scores

    def training_activation_bytes_per_token_layer(
        self, bytes_per_elem: int = 2, seq_len: int = 0
    ) -> int:
        """Activations one layer saves for backward, per token (no gradient checkpointing).

        Counted from what autograd actually saves in transformers' implementations (checked
        with ``torch.autograd.graph.saved_tensors_hooks`` on random-init models, f32 and bf16):
        - Llama (b = bytes_per_elem): each RMSNorm saves its fp32 upcast input and, in b, the
          normalized tensor and its output: 4h + 2bh; SDPA saves q and k after RoPE, v and the
          output: b (2 q_dim + 2 kv_dim); the gated MLP saves gate, SiLU(gate), up and their
          product: 4 b ffn. For b = 2: 20h + 4 kv_dim + 8 ffn.
        - Falcon: each LayerNorm saves input and output: 2bh; attention keeps the fused QKV
          output, a query copy, its output and the merged-heads copy: b (4 q_dim + 2 kv_dim);
          the MLP saves the h_to_4h output and its GELU: 2 b ffn.
        Attention probabilities are not stored by SDPA's memory-efficient kernel (which runs
        on V100; the flash kernel needs sm80); on the math path (``sdpa_math_fallback``) one
        fp32 copy is, heads x ``seq_len`` x 4 B per token. ALiBi's bias mask is per forward,
        not per layer (``alibi_bytes_per_token``). Dropout is 0 in these configs (no masks).
        Frozen linears (LoRA) need not keep their inputs but LoRA dropout adds copies: taken
        as cancelling out, so LoRA uses the same figure.
        """
        b = bytes_per_elem
        h = self.hidden
        probs = self.attention_probs_bytes_per_token_layer(seq_len)
        if self.family == "llama":
            norms = self.norms_per_layer * (4 * h + 2 * b * h)
            return norms + b * (2 * self.q_dim + 2 * self.kv_dim) + 4 * b * self.ffn + probs
        norms = self.norms_per_layer * 2 * b * h
        return norms + b * (4 * self.q_dim + 2 * self.kv_dim) + 2 * b * self.ffn + probs

    def alibi_bytes_per_token(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        """ALiBi models (Falcon-RW) build a heads x seq x seq bias mask per forward pass, kept
        for backward: heads x seq x b per token. Zero for rotary models."""
        return self.n_heads * seq_len * bytes_per_elem if self.alibi else 0

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "family": self.family,
            "model_type": self.model_type,
            "params": self.n_params,
            "layers": self.n_layers,
            "hidden": self.hidden,
            "ffn": self.ffn,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab": self.vocab,
            "context": self.context,
            "tied_embeddings": self.tied_embeddings,
            "torch_dtype": self.torch_dtype,
        }


def _get_int(data: Mapping[str, Any], source: str, *keys: str, default: int | None = None) -> int:
    """The first of ``keys`` present in ``data`` as a positive int (or ``default``)."""
    for key in keys:
        if key in data and data[key] is not None:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(
                    f"{source}: key {key!r} must be a positive integer, got {value!r}"
                )
            return value
    if default is not None:
        return default
    wanted = " or ".join(repr(k) for k in keys)
    raise ModelConfigError(f"{source}: missing key {wanted} (needed to size the model)")


def _get_bool(data: Mapping[str, Any], source: str, key: str, default: bool) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelConfigError(f"{source}: key {key!r} must be true or false, got {value!r}")
    return value


def _dtype_of(data: Mapping[str, Any]) -> str | None:
    raw = data.get("torch_dtype") or data.get("dtype")
    if not isinstance(raw, str):
        return None
    try:
        fmt = normalize_format(raw)
    except ConfigError:
        return None
    return fmt if fmt in _FLOAT_BITS else None


def _llama_shape(data: Mapping[str, Any], source: str, name: str, model_type: str) -> ModelShape:
    hidden = _get_int(data, source, "hidden_size")
    heads = _get_int(data, source, "num_attention_heads")
    notes: tuple[str, ...] = ()
    if model_type not in _LLAMA_TYPES:
        notes = (f"model_type {model_type or '(none)'!r} sized as a Llama-style block",)
    if hidden % heads and "head_dim" not in data:
        raise ModelConfigError(
            f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
            "add 'head_dim'"
        )
    return ModelShape(
        name=name,
        source=source,
        family="llama",
        model_type=model_type,
        n_layers=_get_int(data, source, "num_hidden_layers"),
        hidden=hidden,
        ffn=_get_int(data, source, "intermediate_size"),
        n_heads=heads,
        n_kv_heads=_get_int(data, source, "num_key_value_heads", default=heads),
        head_dim=_get_int(data, source, "head_dim", default=hidden // heads),
        vocab=_get_int(data, source, "vocab_size"),
        context=_get_int(data, source, "max_position_embeddings"),
        # LlamaConfig and MistralConfig default to untied embeddings.
        tied_embeddings=_get_bool(data, source, "tie_word_embeddings", False),
        torch_dtype=_dtype_of(data),
        attention_bias=_get_bool(data, source, "attention_bias", False),
        mlp_bias=_get_bool(data, source, "mlp_bias", False),
        norms_per_layer=2,
        norm_bias=False,
        parallel_attn=False,
        notes=notes,
    )


def _falcon_shape(data: Mapping[str, Any], source: str, name: str, model_type: str) -> ModelShape:
    """Falcon, new keys (``falcon``) or the remote-code ones (``RefinedWebModel`` = 7B style,
    ``RefinedWeb`` = 40B style, which implies the new decoder architecture)."""
    hidden = _get_int(data, source, "hidden_size")
    heads = _get_int(data, source, "num_attention_heads", "n_head")
    new_arch = _get_bool(data, source, "new_decoder_architecture", model_type == "RefinedWeb")
    multi_query = _get_bool(data, source, "multi_query", True)
    parallel = _get_bool(data, source, "parallel_attn", True)
    if new_arch:
        kv_heads = _get_int(data, source, "num_kv_heads", "n_head_kv", default=heads)
        # FalconDecoderLayer: two LayerNorms (ln_attn, ln_mlp) unless num_ln_in_parallel_attn=1.
        norms = 2 if data.get("num_ln_in_parallel_attn") in (None, 2) else 1
    else:
        kv_heads = 1 if multi_query else heads
        norms = 1 if parallel else 2  # input_layernorm (+ post_attention_layernorm)
    if hidden % heads:
        raise ModelConfigError(
            f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )
    bias = _get_bool(data, source, "bias", False)
    return ModelShape(
        name=name,
        source=source,
        family="falcon",
        model_type=model_type,
        n_layers=_get_int(data, source, "num_hidden_layers", "n_layer"),
        hidden=hidden,
        ffn=_get_int(data, source, "ffn_hidden_size", default=4 * hidden),
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=hidden // heads,
        vocab=_get_int(data, source, "vocab_size"),
        # FalconConfig's default; Falcon-7B's config.json does not set it.
        context=_get_int(data, source, "max_position_embeddings", default=2048),
        # PretrainedConfig's default (True): Falcon ties lm_head to word_embeddings.
        tied_embeddings=_get_bool(data, source, "tie_word_embeddings", True),
        torch_dtype=_dtype_of(data),
        attention_bias=bias,
        mlp_bias=bias,
        norms_per_layer=norms,
        norm_bias=True,
        parallel_attn=parallel,
        alibi=_get_bool(data, source, "alibi", False),
        new_decoder_architecture=new_arch,
    )


def weights_bytes(shape: ModelShape, fmt: str) -> int:
    """Bytes of the model's weights in ``fmt``.

    - float (f32/f16/bf16): every parameter at that width (a safetensors checkpoint or the
      model in GPU memory);
    - GGUF types: 2-D tensors at the type's bits per weight, 1-D tensors (norms, biases) in
      f32 as llama.cpp stores them; header and tokenizer metadata (a few MB) not counted;
    - bitsandbytes (int8/nf4): decoder linears quantized, embedding, lm_head and norms kept
      in the f16 compute dtype (transformers never quantizes the output layer).
    """
    kind = format_kind(fmt)
    bits = bits_per_weight(fmt)
    if kind == "float":
        return math.ceil(shape.n_params * bits / 8)
    if kind == "gguf":
        return gguf_bytes(shape, fmt)
    return math.ceil(shape.linear_params * bits / 8) + (shape.n_params - shape.linear_params) * 2


def gguf_bytes(shape: ModelShape, fmt: str) -> int:
    """Size of a GGUF file of ``shape`` in type ``fmt`` (f16/bf16/f32 or a quant type): 2-D
    tensors at ``fmt``'s bits per weight, 1-D tensors in f32."""
    if format_kind(fmt) == "bnb":
        raise ConfigError(f"{fmt!r} is a bitsandbytes format, not a GGUF type")
    matrices = shape.n_params - shape.vector_params
    return math.ceil(matrices * bits_per_weight(fmt) / 8) + shape.vector_params * 4


# --------------------------------------------------------------------------------------------
# Hardware and assumptions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """What a step runs on. For GPUs, ``mem_mb`` is per GPU; for the CPU, host RAM.

    ``compute_efficiency`` is the achieved fraction of peak FLOPs in GEMM-heavy phases
    (prefill, training); ``bandwidth_efficiency`` the achieved fraction of memory bandwidth in
    decode. ``layer_overhead_s`` is the fixed cost per layer per forward step (kernel launches
    and Python in eager PyTorch), which dominates decode for small models.
    """

    name: str
    is_gpu: bool
    mem_mb: int
    flops_f16: float
    flops_f32: float
    mem_bw: float
    compute_efficiency: float
    bandwidth_efficiency: float
    overhead_mb: int
    layer_overhead_s: float
    native_bf16: bool

    def flops(self, fmt: str) -> float:
        """Peak FLOP/s for math in ``fmt`` (quantized weights compute in f16)."""
        fmt = normalize_format(fmt)
        if fmt == "f32" or (fmt == "bf16" and not self.native_bf16):
            return self.flops_f32
        return self.flops_f16


# V100-SXM2-32GB: 125 TFLOPS fp16 tensor-core peak, 15.7 TFLOPS fp32 (no TF32, and no bf16
# tensor cores: bf16 math falls back to about fp32 speed), 900 GB/s HBM2. 30% of peak is a
# typical HF training/prefill figure; decode reaches about 60% of bandwidth. The overhead
# covers CUDA context, cuBLAS workspace and caching-allocator slack per GPU.
V100 = Hardware(
    name="v100",
    is_gpu=True,
    mem_mb=32 * 1024,
    flops_f16=125e12,
    flops_f32=15.7e12,
    mem_bw=900e9,
    compute_efficiency=0.30,
    bandwidth_efficiency=0.60,
    overhead_mb=1024,
    layer_overhead_s=1.5e-4,
    native_bf16=False,
)


def cpu(
    cores: int = 2,
    gflops_per_core: float = 50.0,
    mem_bw_gb_s: float = 20.0,
    mem_gb: float = 8.0,
    compute_efficiency: float = 0.30,
) -> Hardware:
    """A CPU-only machine; the defaults describe the 2-core laptop of the default run.

    50 GFLOPS per core is a conservative fp32 AVX2 FMA figure (2 FMA units x 8 lanes x 2 x
    ~3 GHz = 96 peak); f16/bf16 math is taken at the same rate (few CPUs do it faster, and
    PyTorch often converts). 20 GB/s is achieved dual-channel DDR4 bandwidth.
    """
    flops = cores * gflops_per_core * 1e9
    return Hardware(
        name="cpu",
        is_gpu=False,
        mem_mb=int(mem_gb * 1024),
        flops_f16=flops,
        flops_f32=flops,
        mem_bw=mem_bw_gb_s * 1e9,
        compute_efficiency=compute_efficiency,
        bandwidth_efficiency=0.60,
        overhead_mb=0,
        layer_overhead_s=2e-4,
        native_bf16=True,
    )


@dataclass(frozen=True)
class Assumptions:
    """Tunable factors, each with its default's reason. Calibrate against bench/ results.

    runtime_margin       requested time = prediction x this (Slurm kills at the limit; the
                         throughput numbers are first-order): 1.5.
    mem_margin           requested host memory = predicted peak x this: 1.25.
    min_runtime_min      floor of any request (scheduling, module loads, imports): 5.
    gpu_headroom         fraction of each GPU's memory left unplanned (fragmentation, the
                         driver's reserve; a V100-32GB reports ~32.5 GB): 0.10. On a CPU
                         device, the fraction of its RAM left to the OS.
    max_gpus             GPUs on one node, the most a single job may use: 8.
    startup_s            per job: interpreter, imports, CUDA init: 60.
    net_mb_s             download bandwidth from the hub / shared storage, MB/s: 100.
    storage_mb_s         shared-filesystem read and write, MB/s: 500.
    shm_mb_s             RAM disk read (staged copies), MB/s: 2000.
    hash_mb_s            sha256 verification of a manifest, MB/s (one core): 800.
    cpu_threads          threads of CPU-bound steps (quantize): 4.
    quantize_rate        weights per second per thread for llama.cpp quantization of legacy
                         and k-quant types (IQ types are ~10x slower): 10e6.
    convert_rate         weights per second the official converter casts and writes: 250e6.
    framework_host_mb    host RSS of a Python process with torch + CUDA libraries: 3072.
    tool_host_mb         host RSS of a plain Python tool (download, stage, llama.cpp): 1024.
    convert_in_flight    tensors the lazy converter holds materialized at once: 2.
    llama_cpp_ubatch     llama.cpp's physical batch (n_ubatch), sizes its compute buffer: 512.
    llama_cpp_overhead   llama.cpp's per-layer step overhead relative to eager PyTorch: 0.25.

    Per-step process baselines of the CPU steps (None: the generic ``tool_host_mb`` or
    ``framework_host_mb`` above, which is what ``DEFAULTS`` plans with). ``CALIBRATED`` below
    sets them from measurements of the workflow's own jobs.
    fetch_host_mb        download of a folder or hub snapshot (None: tool_host_mb).
    dequantize_host_mb   download of a packaged GGUF: torch + transformers on the CPU, before
                         any weight (None: framework_host_mb).
    stage_host_mb        cache_to_shm's copying process, RAM disk excluded (None: tool_host_mb).
    convert_host_mb      the converter process (torch CPU, numpy, gguf-py) before any tensor
                         (None: framework_host_mb).
    convert_tensor_bytes bytes per weight of the largest tensor the lazy converter holds at its
                         peak (None: convert_in_flight x (source + f32 + output bytes)).
    quantize_host_mb     Python with libllama loaded, before any tensor (None: tool_host_mb).
    quantize_buffer_bytes bytes per weight of the largest tensor held by llama.cpp's buffers
                         (None: 8, the f32 conversion and work buffers as allocated).
    llama_cpp_cpu_host_mb an evaluation process with libllama on a CPU-only node, weights and
                         buffers excluded (None: tool_host_mb).
    torch_cpu_host_mb    an evaluation or fine-tuning process with torch + transformers on a
                         CPU-only node (no CUDA libraries), weights excluded (None:
                         framework_host_mb).
    """

    runtime_margin: float = 1.5
    mem_margin: float = 1.25
    min_runtime_min: int = 5
    gpu_headroom: float = 0.10
    max_gpus: int = 8
    startup_s: float = 60.0
    net_mb_s: float = 100.0
    storage_mb_s: float = 500.0
    shm_mb_s: float = 2000.0
    hash_mb_s: float = 800.0
    cpu_threads: int = 4
    quantize_rate: float = 10e6
    convert_rate: float = 250e6
    framework_host_mb: int = 3072
    tool_host_mb: int = 1024
    convert_in_flight: int = 2
    llama_cpp_ubatch: int = 512
    llama_cpp_overhead: float = 0.25
    fetch_host_mb: int | None = None
    dequantize_host_mb: int | None = None
    stage_host_mb: int | None = None
    convert_host_mb: int | None = None
    convert_tensor_bytes: float | None = None
    quantize_host_mb: int | None = None
    quantize_buffer_bytes: float | None = None
    llama_cpp_cpu_host_mb: int | None = None
    torch_cpu_host_mb: int | None = None


DEFAULTS = Assumptions()

# The CPU steps calibrated on the workflow's own measurements (peak RSS sampled by
# llmpipe.monitor plus the kernel's ru_maxrss, recorded as "measured" in every record; the
# default run, SmolLM2-135M f16, 2-core VM, llama-cpp-python 0.3.36, torch 2.13 CPU):
CALIBRATED = replace(
    DEFAULTS,
    # Every step runs as a Snakemake `script:`, whose preamble (unpickling the `snakemake`
    # object) alone peaks at 126 MiB.
    fetch_host_mb=245,  # + transformers' config table (imports torch): a `dir` download, 244
    # A packaged GGUF's download measured 1291 MiB for SmolLM2 (134.5 M params): 878 of f32
    # model + f16 copy + one f32 tensor in flight, ~410 for the process (+ model code, gguf).
    dequantize_host_mb=400,
    stage_host_mb=130,  # 126 + copy buffers; measured 130 MiB (+ the RAM-disk bytes)
    convert_host_mb=370,  # 126 + 245 (the converter's own imports: torch CPU, numpy, gguf-py)
    convert_tensor_bytes=4.0,  # f16 -> f16 is not cast through f32; measured 429-436 MiB in all
    quantize_host_mb=145,  # 126 + 19 (libllama)
    # llama.cpp allocates 8 B/weight but touches 4 (f32 conversion) + the output's bytes:
    # measured 273 MiB (Q4_K_M) and 275 MiB (Q8_0) for a 28.3 M-weight largest tensor.
    quantize_buffer_bytes=5.0,
    llama_cpp_cpu_host_mb=145,  # 126 + 19 (libllama), as quantize
    # As the packaged download's process (torch + model code, CPU). The default run's LoRA
    # fine-tune (SmolLM2, f32, 8 x 128 tokens, no checkpointing) measured 2760 MiB in all.
    torch_cpu_host_mb=400,
)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFit:
    """How many GPUs a memory requirement needs. ``gpus`` is None when it does not fit even
    on ``max_gpus``; ``per_gpu_mb`` is then the use at ``max_gpus``."""

    gpus: int | None
    per_gpu_mb: int
    usable_mb: int
    max_gpus: int

    @property
    def fits(self) -> bool:
        return self.gpus is not None

    def __str__(self) -> str:
        if self.gpus is None:
            return (
                f"does not fit even on {self.max_gpus} GPUs "
                f"({self.per_gpu_mb} MB per GPU > {self.usable_mb} MB usable)"
            )
        return f"{self.gpus} GPU(s), {self.per_gpu_mb} MB per GPU of {self.usable_mb} MB usable"


def gpus_needed(
    estimate_gpu_mem_mb: float,
    gpu_mem_mb: int = 32 * 1024,
    headroom: float = DEFAULTS.gpu_headroom,
    *,
    replicated_mb: float = 0.0,
    per_gpu_overhead_mb: float = V100.overhead_mb,
    max_gpus: int = DEFAULTS.max_gpus,
    shard_units: int | None = None,
) -> GpuFit:
    """Smallest GPU count whose per-GPU share fits in ``gpu_mem_mb x (1 - headroom)``.

    ``estimate_gpu_mem_mb`` is the memory that splits across GPUs (weights, KV cache,
    optimizer state, stored activations); ``replicated_mb`` is needed on every GPU (working
    activations, logits); ``per_gpu_overhead_mb`` is CUDA context and workspace. With
    ``shard_units`` (the layer count) the split is by whole layers: each GPU holds up to
    ceil(units / n) of them, so 40 layers on 3 GPUs cost 14/40 of the total per GPU.
    """
    if gpu_mem_mb <= 0 or not 0 <= headroom < 1 or max_gpus < 1:
        raise ConfigError(
            f"gpus_needed: gpu_mem_mb must be > 0, headroom in [0, 1), max_gpus >= 1 "
            f"(got {gpu_mem_mb}, {headroom}, {max_gpus})"
        )
    usable = gpu_mem_mb * (1 - headroom)
    per_gpu = 0.0
    for n in range(1, max_gpus + 1):
        share = estimate_gpu_mem_mb / n
        if shard_units:
            share = estimate_gpu_mem_mb * math.ceil(shard_units / n) / shard_units
        per_gpu = share + replicated_mb + per_gpu_overhead_mb
        if per_gpu <= usable:
            return GpuFit(n, math.ceil(per_gpu), math.floor(usable), max_gpus)
    return GpuFit(None, math.ceil(per_gpu), math.floor(usable), max_gpus)


@dataclass(frozen=True)
class Estimate:
    """The prediction for one step, ready to become a rule's resources.

    ``mem_mb`` host RAM to request (peak x margin, RAM-disk bytes included), ``runtime_min``
    wall time to request, ``gpus`` GPUs to request (0: CPU only), ``gpu_mem_mb`` predicted
    peak per GPU, ``disk_mb`` the step's output on disk. ``fits`` is False when the step does
    not fit even on ``max_gpus`` GPUs (or, on a CPU, in its RAM); ``gpus`` is then the
    maximum tried. ``detail`` holds the raw terms (``*_bytes``, ``*_s``) behind the numbers.
    """

    step: str
    mem_mb: int
    runtime_min: int
    gpus: int = 0
    gpu_mem_mb: int = 0
    fits: bool = True
    disk_mb: int = 0
    notes: tuple[str, ...] = ()
    detail: Mapping[str, float] = field(default_factory=dict)

    def resources(self) -> dict[str, int]:
        """Snakemake resources (``mem_mb``, ``runtime`` in minutes, ``disk_mb``, ``gpu``).

        Raises ``ResourceError`` when the step does not fit: better at planning time than as an
        OOM after hours in the queue.
        """
        if not self.fits:
            raise ResourceError(f"{self.step}: " + "; ".join(self.notes))
        res = {"mem_mb": self.mem_mb, "runtime": self.runtime_min, "disk_mb": self.disk_mb}
        if self.gpus:
            res["gpu"] = self.gpus
        return res

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "mem_mb": self.mem_mb,
            "runtime_min": self.runtime_min,
            "gpus": self.gpus,
            "gpu_mem_mb": self.gpu_mem_mb,
            "fits": self.fits,
            "disk_mb": self.disk_mb,
            "notes": list(self.notes),
            "detail": dict(self.detail),
        }


def _host_mb(peak_bytes: float, a: Assumptions) -> int:
    return math.ceil(peak_bytes * a.mem_margin / MIB)


def _runtime_min(seconds: float, a: Assumptions) -> int:
    return max(a.min_runtime_min, math.ceil(seconds * a.runtime_margin / 60))


def _mb_s(value: float) -> float:
    return value * 1e6


def _place(
    step: str,
    hw: Hardware,
    a: Assumptions,
    *,
    shardable: float,
    replicated: float,
    host_gpu_job: float,
    seconds: float,
    shard_units: int | None,
    disk: float = 0,
    notes: Sequence[str] = (),
    detail: Mapping[str, float] | None = None,
) -> Estimate:
    """Put a GPU-capable step on ``hw``: on a GPU, shard across the fewest GPUs that fit; on a
    CPU, everything is host memory and must fit in its RAM."""
    notes = list(notes)
    detail = dict(detail or {})
    if hw.is_gpu:
        fit = gpus_needed(
            shardable / MIB,
            hw.mem_mb,
            a.gpu_headroom,
            replicated_mb=replicated / MIB,
            per_gpu_overhead_mb=hw.overhead_mb,
            max_gpus=a.max_gpus,
            shard_units=shard_units,
        )
        if not fit.fits:
            notes.insert(0, f"{fit} of a {hw.name}")
        elif fit.gpus and fit.gpus > 1:
            how = "by layer" if shard_units else "evenly (FSDP / ZeRO-3)"
            notes.append(f"sharded {how} over {fit.gpus} GPUs")
        return Estimate(
            step=step,
            mem_mb=_host_mb(host_gpu_job, a),
            runtime_min=_runtime_min(seconds, a),
            gpus=fit.gpus if fit.gpus is not None else a.max_gpus,
            gpu_mem_mb=fit.per_gpu_mb,
            fits=fit.fits,
            disk_mb=math.ceil(disk / MIB),
            notes=tuple(notes),
            detail=detail | {"runtime_s": seconds, "host_peak_bytes": host_gpu_job},
        )
    peak = host_gpu_job + shardable + replicated
    usable = hw.mem_mb * MIB * (1 - a.gpu_headroom)
    fits = peak <= usable
    if not fits:
        notes.insert(
            0,
            f"needs {peak / GIB:.1f} GiB, more than {usable / GIB:.1f} GiB usable of the CPU's RAM",
        )
    return Estimate(
        step=step,
        mem_mb=_host_mb(peak, a),
        runtime_min=_runtime_min(seconds, a),
        fits=fits,
        disk_mb=math.ceil(disk / MIB),
        notes=tuple(notes),
        detail=detail | {"runtime_s": seconds, "host_peak_bytes": peak},
    )


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _checkpoint_dtype(shape: ModelShape, dtype: str | None) -> str:
    if dtype is None or dtype == "auto":
        return shape.torch_dtype or "f16"
    fmt = normalize_format(dtype)
    if format_kind(fmt) != "float":
        raise ConfigError(f"checkpoint dtype {dtype!r}: expected f32, f16 or bf16")
    return fmt


DOWNLOAD_SOURCES = ("hub", "dir", "package")


def download(
    shape: ModelShape,
    *,
    dtype: str | None = None,
    source: str = "hub",
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """Fetch the safetensors checkpoint (in ``dtype``, default the config's ``torch_dtype``)
    and verify its manifest. ``source`` ``hub``/``dir``: streams to disk (or links), memory is a
    plain Python process. ``package``: a GGUF shipped in a Python package is dequantized with
    transformers, which holds the model loaded in f32 and a fresh copy in ``dtype`` at once."""
    if source not in DOWNLOAD_SOURCES:
        raise ConfigError(
            f"download source {source!r}: expected one of {', '.join(DOWNLOAD_SOURCES)}"
        )
    dtype = _checkpoint_dtype(shape, dtype)
    size = weights_bytes(shape, dtype)
    notes = [f"{size / GIB:.1f} GiB of {dtype} safetensors (only *.safetensors, not *.bin)"]
    if source == "package":
        base = a.dequantize_host_mb if a.dequantize_host_mb is not None else a.framework_host_mb
        # the f32 model, its copy in ``dtype``, and one dequantized tensor in flight (f32)
        peak = base * MIB + shape.n_params * 4 + size + shape.largest_tensor_params * 4
        seconds = a.startup_s + shape.n_params / a.convert_rate + size / _mb_s(a.storage_mb_s)
        notes.append(f"dequantized in memory: the f32 model and its {dtype} copy at once")
    else:
        base = a.fetch_host_mb if a.fetch_host_mb is not None else a.tool_host_mb
        peak = base * MIB
        seconds = a.startup_s + size / _mb_s(a.net_mb_s) + size / _mb_s(a.hash_mb_s)
    return Estimate(
        step="download",
        mem_mb=_host_mb(peak, a),
        runtime_min=_runtime_min(seconds, a),
        disk_mb=math.ceil(size / MIB),
        notes=tuple(notes),
        detail={"checkpoint_bytes": size, "runtime_s": seconds, "host_peak_bytes": peak},
    )


def stage(shape: ModelShape, *, weights: str | None = None, a: Assumptions = DEFAULTS) -> Estimate:
    """Copy the model (``weights``: a checkpoint dtype or GGUF type) to the RAM disk and verify.

    tmpfs pages are charged to the memory cgroup of the job that writes them, so Slurm counts
    the staged bytes against the job's ``--mem`` until the files are deleted.
    """
    fmt = (
        _checkpoint_dtype(shape, weights)
        if weights in (None, "auto")
        else normalize_format(weights)
    )
    size = weights_bytes(shape, fmt)
    seconds = a.startup_s + size / _mb_s(a.storage_mb_s) + size / _mb_s(a.hash_mb_s)
    base = a.stage_host_mb if a.stage_host_mb is not None else a.tool_host_mb
    peak = size + base * MIB
    return Estimate(
        step="stage",
        mem_mb=_host_mb(peak, a),
        runtime_min=_runtime_min(seconds, a),
        notes=(f"RAM disk holds {size / GIB:.1f} GiB ({fmt}), counted in the job's memory",),
        detail={"shm_bytes": size, "runtime_s": seconds, "host_peak_bytes": peak},
    )


def convert(
    shape: ModelShape,
    *,
    source_dtype: str | None = None,
    outtype: str = "f16",
    staged: bool = False,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """llama.cpp's convert_hf_to_gguf.py, HF folder -> GGUF in ``outtype``.

    The converter is lazy by default: tensors are memory-mapped and materialized one at a time
    as they are written, so the peak is a few of the largest tensor's copies (source dtype,
    the float32 it casts through, the output), not the whole model. Assumed: ``convert_in_flight``
    tensors at once plus a torch-importing Python process. ``--no-lazy`` would need the whole
    model. ``staged``: the source is on this job's RAM disk and counts against its memory.
    """
    src = _checkpoint_dtype(shape, source_dtype)
    out = normalize_format(outtype)
    if out not in CONVERTER_OUTTYPES:
        raise ConfigError(
            f"convert outtype {outtype!r}: expected one of {', '.join(CONVERTER_OUTTYPES)}"
        )
    src_bytes = weights_bytes(shape, src)
    out_bytes = gguf_bytes(shape, out)
    largest = shape.largest_tensor_params
    per_weight = a.convert_tensor_bytes
    if per_weight is None:
        per_weight = a.convert_in_flight * (bytes_per_weight(src) + 4 + bytes_per_weight(out))
    tensor_peak = largest * per_weight
    base = a.convert_host_mb if a.convert_host_mb is not None else a.framework_host_mb
    peak = base * MIB + tensor_peak + (src_bytes if staged else 0)
    read_mb_s = a.shm_mb_s if staged else a.storage_mb_s
    seconds = (
        a.startup_s
        + src_bytes / _mb_s(read_mb_s)
        + out_bytes / _mb_s(a.storage_mb_s)
        + shape.n_params / a.convert_rate
    )
    notes = [
        f"lazy converter: {a.convert_in_flight} x largest tensor ({largest:,} weights) "
        f"in {src}+f32+{out}",
    ]
    if staged:
        notes.append(f"includes the staged {src_bytes / GIB:.1f} GiB on the RAM disk")
    return Estimate(
        step="convert",
        mem_mb=_host_mb(peak, a),
        runtime_min=_runtime_min(seconds, a),
        disk_mb=math.ceil(out_bytes / MIB),
        notes=tuple(notes),
        detail={
            "tensor_peak_bytes": tensor_peak,
            "gguf_bytes": out_bytes,
            "source_bytes": src_bytes,
            "shm_bytes": src_bytes if staged else 0,
            "runtime_s": seconds,
            "host_peak_bytes": peak,
        },
    )


def quantize(
    shape: ModelShape,
    quant: str = "Q4_K_M",
    *,
    source: str = "f16",
    threads: int | None = None,
    staged: bool = False,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """llama.cpp quantization of a ``source`` GGUF to ``quant`` (in-process, llama-cpp-python).

    llama.cpp memory-maps the input (page cache, reclaimable) and per tensor allocates an f32
    conversion buffer and an output work buffer (4 bytes per weight each): peak is the largest
    tensor x 8 bytes plus the process. CPU-bound at ``quantize_rate`` weights/s/thread.
    """
    quant = normalize_format(quant)
    if format_kind(quant) != "gguf":
        raise ConfigError(f"quantize type {quant!r}: expected a llama.cpp type such as Q4_K_M")
    threads = threads or a.cpu_threads
    src_bytes = gguf_bytes(shape, source)
    out_bytes = gguf_bytes(shape, quant)
    per_weight = a.quantize_buffer_bytes if a.quantize_buffer_bytes is not None else 8
    buffers = shape.largest_tensor_params * per_weight
    base = a.quantize_host_mb if a.quantize_host_mb is not None else a.tool_host_mb
    peak = base * MIB + buffers + (src_bytes if staged else 0)
    rate = a.quantize_rate * threads * (0.1 if quant.startswith("IQ") else 1.0)
    read_mb_s = a.shm_mb_s if staged else a.storage_mb_s
    seconds = (
        a.startup_s
        + src_bytes / _mb_s(read_mb_s)
        + out_bytes / _mb_s(a.storage_mb_s)
        + shape.n_params / rate
    )
    notes = [f"{quant} ~{bits_per_weight(quant)} bits/weight, {threads} threads"]
    if quant.startswith(("IQ1", "IQ2")):
        notes.append("needs an importance matrix (its computation is not included)")
    return Estimate(
        step="quantize",
        mem_mb=_host_mb(peak, a),
        runtime_min=_runtime_min(seconds, a),
        disk_mb=math.ceil(out_bytes / MIB),
        notes=tuple(notes),
        detail={
            "buffer_bytes": buffers,
            "gguf_bytes": out_bytes,
            "shm_bytes": src_bytes if staged else 0,
            "runtime_s": seconds,
            "host_peak_bytes": peak,
        },
    )


# Planning sizes text in tokens before any tokenizer is loaded: English BPE averages ~4 UTF-8
# bytes per token; 3 leaves room.
BYTES_PER_TOKEN = 3


def tokens_bound(n_bytes: int) -> int:
    """An upper bound on the tokens of ``n_bytes`` of UTF-8 text (no special tokens)."""
    return -(-n_bytes // BYTES_PER_TOKEN)


def default_eval_seq_len(shape: ModelShape, new_tokens: int) -> int:
    """Prompt length that fills the context window (capped at 4096) with ``new_tokens``."""
    return max(1, min(shape.context, 4096) - new_tokens)


def default_train_seq_len(shape: ModelShape) -> int:
    """Training sequence length: the context window, capped at 2048."""
    return min(shape.context, 2048)


def _inference_seconds(
    shape: ModelShape,
    hw: Hardware,
    *,
    fmt: str,
    weight_bytes: float,
    kv_bytes_per_token: float,
    batch: int,
    seq_len: int,
    new_tokens: int,
    samples: int,
    layer_overhead_s: float,
) -> dict[str, float]:
    """Prefill is compute-bound: 2 x matmul params + attention (4 x layers x q_dim x context
    per token, averaged over the causal triangle) FLOPs per token. Decode is memory-bound: each
    step reads all weights and the batch's KV cache, so tokens/s <= bandwidth / bytes per step.
    """
    flops = hw.flops(fmt) * hw.compute_efficiency
    bw = hw.mem_bw * hw.bandwidth_efficiency
    step_overhead = shape.n_layers * layer_overhead_s
    prefill_flops = batch * (
        2 * shape.matmul_params * seq_len + 2 * shape.n_layers * shape.q_dim * seq_len**2
    )
    prefill = max(prefill_flops / flops, weight_bytes / bw) + step_overhead
    ctx = seq_len + new_tokens / 2
    step_bytes = weight_bytes + batch * kv_bytes_per_token * ctx
    step_flops = batch * (2 * shape.matmul_params + 4 * shape.n_layers * shape.q_dim * ctx)
    decode_step = max(step_bytes / bw, step_flops / flops) + step_overhead
    batches = math.ceil(samples / batch)
    return {
        "prefill_s": batches * prefill,
        "decode_s": batches * new_tokens * decode_step,
        "decode_tokens_per_s": batch / decode_step,
    }


def evaluate_transformers(
    shape: ModelShape,
    *,
    dtype: str = "f16",
    hw: Hardware = V100,
    batch: int = 1,
    seq_len: int | None = None,
    new_tokens: int = 128,
    samples: int = 16,
    staged: bool = False,
    full_logits: bool = True,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """Evaluation with transformers: ``samples`` prompts of ``seq_len`` tokens (default: fill
    the context, capped at 4096) in batches of ``batch``, each generating ``new_tokens``.

    GPU memory: weights in ``dtype`` (f16/bf16/f32, or bitsandbytes int8/nf4) + KV cache for
    batch x (prompt + new tokens) + the widest layer's transient activations + logits: for every
    position with ``full_logits`` (a perplexity pass keeps them in the dtype, upcast to fp32,
    and a fp32 log-softmax), for the last one only in generation (``full_logits=False``)
    + per-GPU CUDA/framework overhead. Layers split across GPUs with ``device_map``.
    Host memory: the process, the checkpoint's memory-mapped pages while it loads (resident,
    from the RAM disk or the page cache) and, for a GPU, one tensor being converted to
    ``dtype``; on a CPU everything, the load and the run one after the other.
    """
    fmt = normalize_format(dtype)
    if format_kind(fmt) == "gguf":
        raise ConfigError(f"transformers dtype {dtype!r}: expected f32/f16/bf16/int8/nf4")
    seq_len = seq_len or default_eval_seq_len(shape, new_tokens)
    b = _compute_bytes(fmt)
    weights = weights_bytes(shape, fmt)
    kv = shape.kv_cache_bytes(seq_len + new_tokens, batch, b)
    act = batch * seq_len * shape.inference_activation_bytes_per_token(b, seq_len)
    logits = batch * (seq_len if full_logits else 1) * shape.vocab * (b + 4 + 4)
    alibi = batch * seq_len * shape.alibi_bytes_per_token(seq_len, b)
    dequant = (
        max(lin.d_in * lin.d_out for lin in shape.layer_linears()) * 2
        if format_kind(fmt) == "bnb"
        else 0
    )
    times = _inference_seconds(
        shape,
        hw,
        fmt=fmt,
        weight_bytes=weights,
        kv_bytes_per_token=shape.kv_cache_bytes(1, 1, b),
        batch=batch,
        seq_len=seq_len,
        new_tokens=new_tokens,
        samples=samples,
        layer_overhead_s=hw.layer_overhead_s,
    )
    load_s = weights / _mb_s(a.shm_mb_s if staged else a.storage_mb_s)
    seconds = a.startup_s + load_s + times["prefill_s"] + times["decode_s"]
    notes = [
        f"{fmt} weights {weights / GIB:.1f} GiB, "
        f"KV {kv / GIB:.2f} GiB for {batch}x{seq_len + new_tokens} tokens"
    ]
    if seq_len + new_tokens > shape.context:
        notes.append(f"prompt + new tokens exceed the model's context ({shape.context})")
    if fmt == "bf16" and not hw.native_bf16:
        notes.append(f"{hw.name} has no bf16 tensor cores: bf16 runs near fp32 speed, prefer f16")
    if not hw.is_gpu and fmt == "f16":
        notes.append("f16 on CPU is often slower than f32 in PyTorch")
    base = a.framework_host_mb
    if not hw.is_gpu and a.torch_cpu_host_mb is not None:
        base = a.torch_cpu_host_mb
    checkpoint = weights_bytes(shape, _checkpoint_dtype(shape, None))
    running = act + logits + alibi + dequant
    if hw.is_gpu:
        host_gpu_job = base * MIB + checkpoint + shape.largest_tensor_params * b
        shardable, replicated = weights + kv, running
    else:
        # One process holds everything. The checkpoint's mapped pages are let go once it is
        # loaded, before the first token: the peak is the larger of loading and running
        # (measured on SmolLM2 f32: 1153 MiB for generation and perplexity alike, = the load).
        host_gpu_job = base * MIB
        shardable, replicated = weights + max(checkpoint, kv + running), 0
    return _place(
        "evaluate-transformers",
        hw,
        a,
        shardable=shardable,
        replicated=replicated,
        host_gpu_job=host_gpu_job,
        seconds=seconds,
        shard_units=shape.n_layers,
        notes=notes,
        detail={
            "weights_bytes": weights,
            "kv_cache_bytes": kv,
            "activation_bytes": act,
            "logits_bytes": logits,
            "alibi_bytes": alibi,
            "dequant_bytes": dequant,
            "checkpoint_bytes": checkpoint,
            "load_s": load_s,
        }
        | times,
    )


# The KL-divergence against stored reference log-probs (llmpipe.evaluation.metrics) works on
# blocks of this many positions, holding this many float64 [block x vocab] arrays at once.
KLD_BLOCK = 64
KLD_ARRAYS = 4


def evaluate_llama_cpp(
    shape: ModelShape,
    *,
    quant: str = "Q4_K_M",
    hw: Hardware = V100,
    batch: int = 1,
    seq_len: int | None = None,
    new_tokens: int = 128,
    samples: int = 16,
    kv_type: str = "f16",
    n_ctx: int | None = None,
    flash_attn: bool = False,
    outputs: int = 1,
    kld_chunks: int = 0,
    staged: bool = False,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """Evaluation with llama.cpp (all layers offloaded on a GPU; split by layer over GPUs).

    Memory: the GGUF's tensors + KV cache (``kv_type``, f16 by default) + the compute buffer:
    per token of a micro-batch, attention scores (f32, heads x context; none with
    ``flash_attn``) + MLP and residual scratch, and f32 logits for the ``outputs`` positions
    whose logits are wanted per pass (1 in generation; the scored half of a chunk in
    perplexity), which also fill llama.cpp's host output buffer and the caller's copy of it
    (the RSS of llama.cpp's perplexity job measured 584 MiB; predicted 569). ``kld_chunks``:
    chunks of a reference's log-probs read for the KL-divergence (llama-perplexity's
    ``--kl-divergence-base`` format, uint16 per vocabulary entry, memory-mapped: every page read
    stays resident) and compared in blocks of ``KLD_BLOCK`` positions in float64 (SmolLM2, 8
    chunks: 725 MiB measured, 728 predicted). ``n_ctx`` is the context llama.cpp
    allocates per sequence (default: prompt + new tokens). On a GPU the allocation is what
    counts: KV for ``n_ctx`` cells and a compute buffer reserved for ``llama_cpp_ubatch`` tokens
    at that context; the file is memory-mapped and copied to the GPU (host pages are page
    cache), so host memory is the process (+ the file when staged). On a CPU only pages written
    count: the KV cells and scratch that ``seq_len`` + ``new_tokens`` use, and the
    memory-mapped GGUF, which is the weights themselves.
    """
    fmt = normalize_format(quant)
    if format_kind(fmt) == "bnb":
        raise ConfigError(f"llama.cpp weights {quant!r}: expected a GGUF type (f16, Q4_K_M, ...)")
    seq_len = seq_len or default_eval_seq_len(shape, new_tokens)
    kv_b = bytes_per_weight(kv_type)
    gguf = gguf_bytes(shape, fmt)
    used = seq_len + new_tokens
    allocated = max(n_ctx or 0, used)

    def compute_buffer(tokens: int, context: int, logit_rows: int) -> int:
        scores = 0 if flash_attn else shape.n_heads * context
        return 4 * (tokens * (scores + 2 * shape.ffn + 4 * shape.hidden) + logit_rows * shape.vocab)

    if hw.is_gpu:  # reserved for the worst case: a full micro-batch, every row's logits
        kv = shape.kv_cache_bytes(allocated, batch, kv_b)
        compute = compute_buffer(a.llama_cpp_ubatch, batch * allocated, a.llama_cpp_ubatch)
    else:
        tokens = min(a.llama_cpp_ubatch, batch * seq_len)
        kv = shape.kv_cache_bytes(used, batch, kv_b)
        compute = compute_buffer(tokens, batch * used, min(tokens, batch * outputs))
    logits_out = 2 * batch * outputs * shape.vocab * 4  # output buffer + the caller's copy
    kld = 0
    if kld_chunks:
        # uint16 words per position, as llmpipe.evaluation.metrics.record_width (numpy-free here)
        width = 2 * ((shape.vocab + 1) // 2) + 4
        kld = kld_chunks * outputs * width * 2 + KLD_BLOCK * shape.vocab * 8 * KLD_ARRAYS
    cells = batch * (allocated if hw.is_gpu else used)
    times = _inference_seconds(
        shape,
        hw,
        fmt=fmt,
        weight_bytes=gguf,
        kv_bytes_per_token=shape.kv_cache_bytes(1, 1, kv_b),
        batch=batch,
        seq_len=seq_len,
        new_tokens=new_tokens,
        samples=samples,
        layer_overhead_s=hw.layer_overhead_s * a.llama_cpp_overhead,
    )
    load_s = gguf / _mb_s(a.shm_mb_s if staged else a.storage_mb_s)
    seconds = a.startup_s + load_s + times["prefill_s"] + times["decode_s"]
    notes = [
        f"{fmt} GGUF {gguf / GIB:.1f} GiB, KV ({kv_type}) {kv / GIB:.2f} GiB for {cells} cells"
    ]
    if allocated > shape.context:
        notes.append(f"prompt + new tokens exceed the model's context ({shape.context})")
    base = a.tool_host_mb
    if not hw.is_gpu and a.llama_cpp_cpu_host_mb is not None:
        base = a.llama_cpp_cpu_host_mb
    # On the CPU llama.cpp memory-maps the GGUF and computes from the mapping: a staged copy
    # is the weights themselves, not a second copy. On a GPU the staged file stays on the host.
    host_gpu_job = base * MIB + logits_out + kld + (gguf if staged and hw.is_gpu else 0)
    return _place(
        "evaluate-llama.cpp",
        hw,
        a,
        shardable=gguf + kv,
        replicated=compute,
        host_gpu_job=host_gpu_job,
        seconds=seconds,
        shard_units=shape.n_layers,
        notes=notes,
        detail={
            "gguf_bytes": gguf,
            "kv_cache_bytes": kv,
            "compute_buffer_bytes": compute,
            "logits_out_bytes": logits_out,
            "kld_bytes": kld,
            "load_s": load_s,
        }
        | times,
    )


def imatrix(
    shape: ModelShape,
    *,
    source: str = "f16",
    hw: Hardware = V100,
    n_ctx: int = 512,
    chunks: int = 100,
    staged: bool = False,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """llama.cpp's ``llama-imatrix`` on the reference GGUF (``source``): the importance matrix
    of a model's ``-imat`` variants, from ``chunks`` chunks of ``n_ctx`` tokens.

    It is the perplexity evaluation of the reference (``evaluate_llama_cpp``: one pass per chunk
    from an empty cache, run with ``-b n_ctx``), with the logits of every position kept (the
    tool scores each chunk's second half but asks for all rows), flash attention as llama.cpp
    leaves it by default (off: planned with the attention scores), plus what the tool adds on
    the host: the matrix (an f32 sum of squares and a count per input column of every layer
    matrix) and the copy of a matmul's input it takes from a GPU (``n_ctx`` rows of the widest
    input, f32).
    """
    base = evaluate_llama_cpp(
        shape,
        quant=source,
        hw=hw,
        batch=1,
        seq_len=n_ctx - 1,
        new_tokens=1,
        samples=chunks,
        n_ctx=n_ctx,
        flash_attn=False,
        outputs=n_ctx,
        staged=staged,
        a=a,
    )
    columns = shape.n_layers * sum(lin.d_in for lin in shape.layer_linears())
    matrix = columns * (4 + 4)
    copy = n_ctx * max(lin.d_in for lin in shape.layer_linears()) * 4 if hw.is_gpu else 0
    peak = base.detail["host_peak_bytes"] + matrix + copy
    notes = (*base.notes, f"{chunks} chunks x {n_ctx} tokens of calibration text")
    return replace(
        base,
        step="imatrix",
        mem_mb=_host_mb(peak, a),
        notes=notes,
        detail={**base.detail, "matrix_bytes": matrix, "host_peak_bytes": peak},
    )


def evaluate(shape: ModelShape, backend: str = "transformers", **kwargs: Any) -> Estimate:
    """Dispatch to ``evaluate_transformers`` or ``evaluate_llama_cpp`` by backend name."""
    if backend == "transformers":
        return evaluate_transformers(shape, **kwargs)
    if backend in ("llama.cpp", "llama_cpp", "llamacpp"):
        return evaluate_llama_cpp(shape, **kwargs)
    raise ConfigError(f"evaluation backend {backend!r}: expected 'transformers' or 'llama.cpp'")


FINETUNE_METHODS = ("lora", "qlora", "full")


def finetune(
    shape: ModelShape,
    method: str = "lora",
    *,
    dtype: str = "f16",
    quant: str = "nf4",
    gradient_checkpointing: bool = True,
    micro_batch: int = 4,
    seq_len: int | None = None,
    lora_rank: int = 16,
    lora_targets: str = "all-linear",
    steps: int = 100,
    grad_accum: int = 1,
    hw: Hardware = V100,
    staged: bool = False,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """Fine-tuning with AdamW: ``steps`` optimizer steps of ``grad_accum`` micro-batches of
    ``micro_batch`` x ``seq_len`` tokens (default: context capped at 2048).

    Memory per parameter:
    - full: mixed precision keeps weights (2 B in f16/bf16) + gradients (2 B) + fp32 master
      weights (4 B) + AdamW m and v (8 B) = 16 B; in f32 4 + 4 + 8 = 16 B too. More than one
      GPU means the states are sharded (FSDP / ZeRO-3).
    - lora: frozen base in ``dtype`` + trainable adapters in fp32 (4 B weight + 4 B gradient +
      8 B AdamW = 16 B; fp16 GradScaler needs fp32 trainable parameters).
    - qlora: as lora, base decoder linears in ``quant`` (nf4), dequantized one at a time.
    Activations: ``training_activation_bytes_per_token_layer`` x tokens x layers without
    gradient checkpointing; with it, each layer's input (hidden x b) is kept and one layer's
    activations are recomputed at a time. Logits: b + fp32 copy + fp32 log-softmax + fp32
    gradient = b + 12 bytes per vocab entry per token.
    Runtime from FLOPs per token: full 6N (forward 2N, backward 4N), LoRA/QLoRA 4N (the frozen
    weights' gradients, 2N, are skipped; input gradients are not), +2N with gradient
    checkpointing (a second forward); attention adds 3x (4x) its forward FLOPs. Multi-GPU runs
    are assumed to share one model copy (device_map / FSDP at the same global batch), so the
    runtime is not divided by the GPU count.
    """
    if method not in FINETUNE_METHODS:
        raise ConfigError(
            f"fine-tune method {method!r}: expected one of {', '.join(FINETUNE_METHODS)}"
        )
    fmt = normalize_format(dtype)
    if format_kind(fmt) != "float":
        raise ConfigError(
            f"fine-tune dtype {dtype!r}: expected f32, f16 or bf16 (see quant= for QLoRA)"
        )
    seq_len = seq_len or default_train_seq_len(shape)
    b = _compute_bytes(fmt)
    tokens = micro_batch * seq_len
    n = shape.n_params
    notes: list[str] = []
    dequant = 0
    trainable = 0
    if method == "full":
        base = 0
        states = 16 * n
        trainable = n
        matmul_factor = 6
        notes.append("weights + grads + fp32 master + AdamW = 16 B/param")
    else:
        trainable = shape.lora_params(lora_rank, lora_targets)
        states = 16 * trainable
        matmul_factor = 4
        if method == "lora":
            base = weights_bytes(shape, fmt)
        else:
            qfmt = normalize_format(quant)
            if format_kind(qfmt) != "bnb":
                raise ConfigError(
                    f"QLoRA quant {quant!r}: expected a bitsandbytes format (nf4, fp4, int8)"
                )
            base = weights_bytes(shape, qfmt)
            dequant = max(lin.d_in * lin.d_out for lin in shape.layer_linears()) * 2
            if not hw.is_gpu:
                notes.append("bitsandbytes 4-bit training needs a GPU in most builds")
        notes.append(f"LoRA r={lora_rank} {lora_targets}: {trainable:,} trainable params")
    per_layer = shape.training_activation_bytes_per_token_layer(b, seq_len)
    if gradient_checkpointing:
        stored = tokens * shape.n_layers * shape.hidden * b
        transient = tokens * per_layer
        matmul_factor += 2
        attn_factor = 4
    else:
        stored = tokens * shape.n_layers * per_layer
        transient = 0
        attn_factor = 3
    logits = tokens * shape.vocab * (b + 12)
    alibi = tokens * shape.alibi_bytes_per_token(seq_len, b)

    flops_per_token = (
        matmul_factor * shape.matmul_params
        + attn_factor * 2 * shape.n_layers * shape.q_dim * seq_len
        + (6 * trainable if method != "full" else 0)
    )
    total_tokens = steps * grad_accum * tokens
    compute_s = total_tokens * flops_per_token / (hw.flops(fmt) * hw.compute_efficiency)
    bw = hw.mem_bw * hw.bandwidth_efficiency
    optimizer_s = steps * 2 * states / bw
    dequant_s = 0.0
    if method == "qlora":
        passes = 3 if gradient_checkpointing else 2
        per_pass = shape.linear_params * (bytes_per_weight(quant) + 2 + 2)
        dequant_s = steps * grad_accum * passes * per_pass / bw
    load_s = (n * b) / _mb_s(a.shm_mb_s if staged else a.storage_mb_s)
    seconds = a.startup_s + load_s + compute_s + optimizer_s + dequant_s
    if fmt == "bf16" and not hw.native_bf16:
        notes.append(f"{hw.name} has no bf16 tensor cores: bf16 runs near fp32 speed, prefer f16")
    process_mb = a.framework_host_mb
    if not hw.is_gpu and a.torch_cpu_host_mb is not None:
        process_mb = a.torch_cpu_host_mb
    host_gpu_job = process_mb * MIB + shape.largest_tensor_params * b
    if staged:
        host_gpu_job += weights_bytes(shape, _checkpoint_dtype(shape, None))
    if method == "full":
        # FSDP / ZeRO-3: parameters, gradients and optimizer state split evenly; every GPU runs
        # the whole model on its own micro-batch, so activations and logits are per GPU.
        shardable, replicated, units = states, stored + transient + logits + alibi, None
    else:
        # One process, layers split over GPUs (device_map): a layer's weights and stored
        # activations live on its GPU; the recomputed layer and the logits are the peak anywhere.
        shardable, replicated, units = (
            base + states + stored,
            transient + logits + dequant,
            shape.n_layers,
        )
    est = _place(
        f"finetune-{method}",
        hw,
        a,
        shardable=shardable,
        replicated=replicated,
        host_gpu_job=host_gpu_job,
        seconds=seconds,
        shard_units=units,
        notes=notes,
        detail={
            "weights_bytes": base if method != "full" else n * b,
            "trainable_params": trainable,
            "states_bytes": states,
            "stored_activation_bytes": stored,
            "transient_activation_bytes": transient,
            "logits_bytes": logits,
            "alibi_bytes": alibi,
            "dequant_bytes": dequant,
            "tokens": total_tokens,
            "compute_s": compute_s,
            "optimizer_s": optimizer_s,
            "dequant_s": dequant_s,
            "load_s": load_s,
        },
    )
    gc = "on" if gradient_checkpointing else "off"
    return replace(est, step=f"{est.step} (gc {gc})")


def merge(
    shape: ModelShape,
    *,
    dtype: str = "f16",
    lora_rank: int = 16,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """PEFT's merge_and_unload of a LoRA adapter into the base, on the CPU, saved as safetensors.

    The base is loaded in ``dtype``; each targeted matrix gets B @ A added in place (one
    matrix-sized f32 delta at a time); saving streams the tensors out. The peak is the model
    once plus the torch process (measured: 592 MiB for SmolLM2 in f16, 257 MiB of weights).
    """
    fmt = normalize_format(dtype)
    if format_kind(fmt) != "float":
        raise ConfigError(f"merged dtype {dtype!r}: expected f32, f16 or bf16")
    weights = weights_bytes(shape, fmt)
    delta = max(lin.d_in * lin.d_out for lin in shape.layer_linears()) * 4
    base = a.torch_cpu_host_mb if a.torch_cpu_host_mb is not None else a.framework_host_mb
    peak = base * MIB + weights + delta
    adapter = shape.lora_params(lora_rank) * 4
    seconds = (
        a.startup_s
        + (weights + adapter) / _mb_s(a.storage_mb_s)  # read the base and the adapter
        + weights / _mb_s(a.storage_mb_s)  # write the merged model
        + weights / _mb_s(a.hash_mb_s)  # the manifest's sha256
    )
    return Estimate(
        step="merge",
        mem_mb=_host_mb(peak, a),
        runtime_min=_runtime_min(seconds, a),
        disk_mb=math.ceil(weights / MIB),
        notes=(f"{fmt} model {weights / GIB:.2f} GiB on the CPU",),
        detail={
            "weights_bytes": weights,
            "delta_bytes": delta,
            "runtime_s": seconds,
            "host_peak_bytes": peak,
        },
    )


def estimate_all(
    shape: ModelShape,
    *,
    dtype: str = "f16",
    quant: str = "Q4_K_M",
    hw: Hardware = V100,
    batch: int = 1,
    seq_len: int | None = None,
    new_tokens: int = 128,
    samples: int = 16,
    micro_batch: int = 4,
    steps: int = 100,
    lora_rank: int = 16,
    staged: bool = False,
    a: Assumptions = DEFAULTS,
) -> list[Estimate]:
    """Every step for one model, in workflow order (the CLI's table)."""
    rows = [
        download(shape, a=a),
        stage(shape, a=a),
        convert(shape, staged=staged, a=a),
        imatrix(shape, hw=hw, staged=staged, a=a),
        quantize(shape, quant, staged=staged, a=a),
        evaluate_transformers(
            shape, dtype=dtype, hw=hw, batch=batch, seq_len=seq_len, new_tokens=new_tokens,
            samples=samples, staged=staged, a=a,
        ),
        evaluate_llama_cpp(
            shape, quant=quant, hw=hw, batch=batch, seq_len=seq_len, new_tokens=new_tokens,
            samples=samples, staged=staged, a=a,
        ),
    ]  # fmt: skip
    train_dtype = dtype if format_kind(dtype) == "float" else "f16"
    for method in FINETUNE_METHODS:
        for gc in (True, False):
            rows.append(
                finetune(
                    shape, method, dtype=train_dtype, gradient_checkpointing=gc,
                    micro_batch=micro_batch, seq_len=seq_len, lora_rank=lora_rank, steps=steps,
                    hw=hw, staged=staged, a=a,
                )
            )  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _fmt_gb(mb: float) -> str:
    return f"{mb / 1024:.1f}"


def _fmt_runtime(minutes: int) -> str:
    return f"{minutes // 60}h{minutes % 60:02d}m"


def format_table(
    shape: ModelShape, rows: Sequence[Estimate], hw: Hardware, header: str = ""
) -> str:
    """Fixed-width table: one row per step, then the notes by step."""
    lines = [
        f"model {shape.name} ({shape.model_type or shape.family}): {shape.n_params:,} params, "
        f"{shape.n_layers} layers, hidden {shape.hidden}, "
        f"heads {shape.n_heads}/{shape.n_kv_heads} kv, "
        f"vocab {shape.vocab}, context {shape.context}",
    ]
    if header:
        lines.append(header)
    gpu_col = f"GPU GB/{hw.name}" if hw.is_gpu else "GPU GB"
    lines.append(f"{'step':<28} {'host GB':>8} {gpu_col:>12} {'GPUs':>6} {'runtime':>9}")
    lines.append("-" * 67)
    for est in rows:
        gpu_mem = _fmt_gb(est.gpu_mem_mb) if est.gpus else "-"
        gpus = str(est.gpus)
        if not est.fits:
            gpus = f">{est.gpus}" if hw.is_gpu else "no fit"
        lines.append(
            f"{est.step:<28} {_fmt_gb(est.mem_mb):>8} {gpu_mem:>12} {gpus:>6} "
            f"{_fmt_runtime(est.runtime_min):>9}"
        )
    lines.append("")
    lines.append("notes:")
    for est in rows:
        for note in est.notes:
            lines.append(f"  {est.step}: {note}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmpipe-estimate",
        description=(
            "Predict host memory, GPU memory, GPU count and runtime of every workflow step for a "
            "model, from its config.json. Memory and runtime include the safety margins that the "
            "Slurm requests use."
        ),
    )
    p.add_argument("config", help="the model's config.json (or its folder)")
    p.add_argument(
        "--dtype",
        help="transformers dtype / fine-tune dtype (default f16; f32 on cpu; auto = config)",
    )
    p.add_argument("--quant", default="Q4_K_M", help="llama.cpp quant type (default Q4_K_M)")
    p.add_argument(
        "--device",
        choices=("v100", "cpu"),
        default="v100",
        help="where evaluation and fine-tuning run",
    )
    p.add_argument("--batch", type=int, default=1, help="evaluation batch size (default 1)")
    p.add_argument(
        "--seq-len",
        type=int,
        help="evaluation prompt and training sequence length (default: from the context)",
    )
    p.add_argument(
        "--new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)"
    )
    p.add_argument("--samples", type=int, default=16, help="prompts evaluated (default 16)")
    p.add_argument("--micro-batch", type=int, default=4, help="fine-tuning micro-batch (default 4)")
    p.add_argument(
        "--steps", type=int, default=100, help="fine-tuning optimizer steps (default 100)"
    )
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument(
        "--gpu-mem-gb", type=float, default=32, help="memory per GPU in GiB (default 32)"
    )
    p.add_argument(
        "--max-gpus", type=int, default=DEFAULTS.max_gpus, help="GPUs per node (default 8)"
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=DEFAULTS.gpu_headroom,
        help="unplanned GPU memory fraction",
    )
    p.add_argument(
        "--efficiency", type=float, help="achieved fraction of peak FLOPs (default 0.30)"
    )
    p.add_argument(
        "--safety-margin",
        type=float,
        default=DEFAULTS.runtime_margin,
        help="runtime multiplier (1.5)",
    )
    p.add_argument("--cpu-cores", type=int, default=2, help="cores of the cpu device (default 2)")
    p.add_argument(
        "--cpu-gflops-per-core", type=float, default=50.0, help="cpu peak GFLOPS per core (50)"
    )
    p.add_argument(
        "--cpu-mem-bw-gbs", type=float, default=20.0, help="cpu memory bandwidth GB/s (20)"
    )
    p.add_argument("--cpu-mem-gb", type=float, default=8.0, help="cpu RAM in GiB (8)")
    p.add_argument(
        "--threads", type=int, default=DEFAULTS.cpu_threads, help="threads of CPU-bound steps (4)"
    )
    p.add_argument(
        "--staged", action="store_true", help="steps read the model from their own RAM disk copy"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        shape = ModelShape.from_config(args.config)
        a = replace(
            CALIBRATED,  # what the workflow's rules request
            gpu_headroom=args.headroom,
            max_gpus=args.max_gpus,
            runtime_margin=args.safety_margin,
            cpu_threads=args.threads,
        )
        if args.device == "cpu":
            hw = cpu(args.cpu_cores, args.cpu_gflops_per_core, args.cpu_mem_bw_gbs, args.cpu_mem_gb)
        else:
            hw = replace(V100, mem_mb=int(args.gpu_mem_gb * 1024))
        if args.efficiency is not None:
            hw = replace(hw, compute_efficiency=args.efficiency)
        dtype = args.dtype or ("f32" if args.device == "cpu" else "f16")
        if dtype == "auto":
            dtype = shape.torch_dtype or "f16"
        rows = estimate_all(
            shape,
            dtype=dtype,
            quant=args.quant,
            hw=hw,
            batch=args.batch,
            seq_len=args.seq_len,
            new_tokens=args.new_tokens,
            samples=args.samples,
            micro_batch=args.micro_batch,
            steps=args.steps,
            lora_rank=args.lora_rank,
            staged=args.staged,
            a=a,
        )
    except PipelineError as exc:
        print(f"llmpipe-estimate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        doc = {
            "model": shape.summary(),
            "device": hw.name,
            "gpu_mem_mb": hw.mem_mb if hw.is_gpu else 0,
            "dtype": normalize_format(dtype),
            "quant": normalize_format(args.quant),
            "steps": [est.as_dict() for est in rows],
        }
        print(json.dumps(doc, indent=2))
    else:
        header = (
            f"device {hw.name}"
            + (
                f" ({hw.mem_mb / 1024:g} GiB/GPU, headroom {a.gpu_headroom:.0%})"
                if hw.is_gpu
                else ""
            )
            + f", dtype {normalize_format(dtype)}, quant {normalize_format(args.quant)}, "
            f"runtime margin x{a.runtime_margin:g}, host memory margin x{a.mem_margin:g}"
        )
        print(format_table(shape, rows, hw, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
