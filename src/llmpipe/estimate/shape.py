"""The sizes of a decoder-only transformer (``ModelShape``), read from its Hugging Face
config.json, and the bytes of its weights in each format."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe.errors import ConfigError
from llmpipe.estimate.formats import bits_per_weight, format_kind, normalize_format


class ModelConfigError(ConfigError, ValueError):
    """A model's config.json is unreadable or lacks a key the estimator needs."""


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
    return fmt if format_kind(fmt) == "float" else None


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


def checkpoint_dtype(shape: ModelShape, dtype: str | None) -> str:
    """The dtype of the model's safetensors checkpoint: ``dtype``, or with None/"auto" the
    config's ``torch_dtype`` (f16 when it has none)."""
    if dtype is None or dtype == "auto":
        return shape.torch_dtype or "f16"
    fmt = normalize_format(dtype)
    if format_kind(fmt) != "float":
        raise ConfigError(f"checkpoint dtype {dtype!r}: expected f32, f16 or bf16")
    return fmt
