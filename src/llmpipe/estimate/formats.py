"""Weight formats: bits per weight of every float dtype, llama.cpp quant type and bitsandbytes
format, and their canonical spellings."""

from __future__ import annotations

from llmpipe.constants import IMATRIX_SUFFIX
from llmpipe.errors import ConfigError

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


def compute_bytes(fmt: str) -> int:
    """Bytes per activation element when running weights of ``fmt`` (quantized -> f16 math)."""
    return 4 if normalize_format(fmt) == "f32" else 2


# --------------------------------------------------------------------------------------------
# Model shape
