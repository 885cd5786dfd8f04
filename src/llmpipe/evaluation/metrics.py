"""Quality metrics in plain numpy: perplexity and KL-divergence exactly as ``llama-perplexity``.

The method (llama.cpp ``tools/perplexity/perplexity.cpp``, pinned version):

- The evaluation text is tokenized once (with BOS when the model adds one) and cut into
  non-overlapping chunks of ``n_ctx`` tokens; a tail shorter than ``n_ctx`` is dropped. When the
  model adds BOS, the first token of every chunk is replaced by BOS for the forward pass.
- Each chunk is one forward pass from an empty KV cache. Only the second half is scored: the
  logits at positions ``first = n_ctx // 2`` .. ``n_ctx - 2`` predict tokens ``first + 1`` ..
  ``n_ctx - 1``, so every scored token has at least ``n_ctx / 2`` tokens of context.
  That is ``n_ctx - 1 - n_ctx // 2`` tokens per chunk (255 at ``n_ctx`` 512).
- PPL = exp(mean negative log-likelihood); its uncertainty is PPL x the standard error of the
  mean NLL.
- The reference ("base") model's log-probabilities are stored per scored token as llama.cpp's
  ``--kl-divergence-base`` file does: uint16 codes over the 16 nats below the top logit, with a
  float32 scale and offset per token (see ``encode_logprobs``). Our reference files are valid
  ``llama-perplexity --kl-divergence-base`` files and theirs are valid inputs here.
- Per scored token: KLD(base || model) = sum_i p_base_i (log p_base_i - log q_i) over the tokens
  with log p_base_i > -16 (llama.cpp's cut-off); "same top" = the arg-max tokens agree;
  delta-p = p(correct token) - p_base(correct token).
- The PPL ratio is exp(mean NLL - mean NLL_base) with llama.cpp's covariance-aware uncertainty.

Everything here is a pure function of arrays: no model, no file format but the base file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmpipe.constants import KLD_BLOCK, record_width

LOG_FLOOR = 16.0  # llama.cpp keeps (and scores) log-probs within 16 nats of the top one
MAGIC = b"_logits_"
# Rows per vectorised step (bounds memory for large vocabularies; the estimator plans with it).
ROW_BLOCK = KLD_BLOCK


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


def first_scored(n_ctx: int) -> int:
    """Position of the first logit that is scored in a chunk (llama.cpp: ``n_ctx / 2``)."""
    return n_ctx // 2


def scored_per_chunk(n_ctx: int) -> int:
    """Tokens scored per chunk: ``n_ctx - 1 - n_ctx // 2``."""
    return n_ctx - 1 - n_ctx // 2


def make_chunks(tokens, n_ctx: int, max_chunks: int | None = None) -> np.ndarray:
    """The text's tokens as ``[n_chunk, n_ctx]`` int32, non-overlapping; the short tail dropped."""
    if n_ctx < 4:
        raise ValueError(f"n_ctx={n_ctx}: expected at least 4")
    tokens = np.asarray(tokens, dtype=np.int32)
    n_chunk = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    if n_chunk < 1:
        raise ValueError(
            f"the evaluation text has {len(tokens)} tokens, fewer than one chunk of n_ctx={n_ctx} "
            f"(use a longer text or a smaller perplexity n_ctx)"
        )
    return tokens[: n_chunk * n_ctx].reshape(n_chunk, n_ctx).copy()


def model_input(chunk: np.ndarray, bos: int | None) -> np.ndarray:
    """What the model is fed for one chunk: the first token replaced by BOS when it adds one."""
    out = np.array(chunk, dtype=np.int32, copy=True)
    if bos is not None:
        out[0] = bos
    return out


def chunk_targets(chunk: np.ndarray) -> np.ndarray:
    """The tokens the scored logits predict: positions ``first + 1`` .. ``n_ctx - 1``."""
    n_ctx = len(chunk)
    return np.asarray(chunk[first_scored(n_ctx) + 1 :], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Per-token quantities
# --------------------------------------------------------------------------------------------


def _blocks(n: int) -> Iterator[slice]:
    for start in range(0, n, ROW_BLOCK):
        yield slice(start, min(n, start + ROW_BLOCK))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets[t]`` under the softmax of ``logits[t]`` (float64)."""
    logits = np.asarray(logits)
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(targets):
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} do not match")
    out = np.empty(len(targets), dtype=np.float64)
    for blk in _blocks(len(targets)):
        logp = _log_softmax(logits[blk])
        out[blk] = -logp[np.arange(len(logp)), targets[blk]]
    return out


def encode_logprobs(logits: np.ndarray) -> np.ndarray:
    """llama.cpp's compact log-probabilities: ``[T, record_width]`` uint16 for ``[T, V]`` logits.

    Per token: ``min_logit = max(min logit, max logit - 16)``, ``scale = (max - min_logit) /
    65535``; code ``i`` = round((logit_i - min_logit) / scale) for logits above ``min_logit``,
    else 0; the header holds ``scale`` and ``min_log_prob = min_logit - max - log(sum exp)``.
    Decoded log-prob = ``scale * code + min_log_prob`` (error <= scale / 2 = 1.2e-4 nats).
    """
    logits = np.asarray(logits, dtype=np.float32)
    n_tok, n_vocab = logits.shape
    out = np.zeros((n_tok, record_width(n_vocab)), dtype=np.uint16)
    for blk in _blocks(n_tok):
        x = logits[blk]
        top = x.max(axis=1)
        low = np.maximum(x.min(axis=1), top - np.float32(LOG_FLOOR))
        sum_exp = np.exp((x - top[:, None]).astype(np.float64)).sum(axis=1)
        log_sum_exp = np.log(sum_exp).astype(np.float32)
        min_log_prob = (low - top - log_sum_exp).astype(np.float32)
        scale = ((top - low) / np.float32(65535)).astype(np.float32)
        header = np.stack([scale, min_log_prob], axis=1).astype("<f4")
        out[blk, :4] = header.view("<u2")
        safe = np.where(scale > 0, scale, np.float32(1))
        inv = (np.float32(1) / safe).astype(np.float32)
        codes = np.rint(inv[:, None] * (x - low[:, None])).astype(np.float32)
        codes = np.where((x > low[:, None]) & (scale[:, None] > 0), codes, 0)
        out[blk, 4 : 4 + n_vocab] = np.clip(codes, 0, 65535).astype(np.uint16)
    return out


def decode_logprobs(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """Log-probabilities ``[T, V]`` (float32) from ``encode_logprobs`` records."""
    records = np.ascontiguousarray(records, dtype=np.uint16)
    header = records[:, :4].copy().view("<f4")  # [T, 2]: scale, min_log_prob
    scale, min_log_prob = header[:, 0], header[:, 1]
    codes = records[:, 4 : 4 + n_vocab].astype(np.float32)
    return (scale[:, None] * codes + min_log_prob[:, None]).astype(np.float32)


def compare_to_base(logits: np.ndarray, base_records: np.ndarray, targets: np.ndarray) -> dict:
    """Per-token comparison of a model's logits with the reference's stored log-probs.

    Returns arrays: ``nll``, ``nll_base``, ``kld`` (KLD(base || model) over base tokens with
    log-prob > -16, as llama.cpp), ``same_top`` (bool: both arg-maxes agree, first maximum wins)
    and ``p_diff`` (p - p_base of the correct token).
    """
    logits = np.asarray(logits)
    targets = np.asarray(targets, dtype=np.int64)
    n_tok, n_vocab = logits.shape
    if len(base_records) != n_tok or len(targets) != n_tok:
        raise ValueError(
            f"logits ({n_tok} tokens), base ({len(base_records)}) and targets ({len(targets)}) "
            f"differ in length"
        )
    out = {
        "nll": np.empty(n_tok),
        "nll_base": np.empty(n_tok),
        "kld": np.empty(n_tok),
        "same_top": np.empty(n_tok, dtype=bool),
        "p_diff": np.empty(n_tok),
    }
    for blk in _blocks(n_tok):
        rows = np.arange(blk.stop - blk.start)
        logq = _log_softmax(logits[blk])
        base = decode_logprobs(base_records[blk], n_vocab).astype(np.float64)
        tgt = targets[blk]
        nll = -logq[rows, tgt]
        nll_base = -base[rows, tgt]
        kept = base > -LOG_FLOOR
        p_base = np.where(kept, np.exp(base), 0.0)
        out["nll"][blk] = nll
        out["nll_base"][blk] = nll_base
        out["kld"][blk] = (p_base * np.where(kept, base - logq, 0.0)).sum(axis=1)
        out["same_top"][blk] = np.argmax(logits[blk], axis=1) == np.argmax(base, axis=1)
        out["p_diff"][blk] = np.exp(-nll) - np.exp(-nll_base)
    return out


# --------------------------------------------------------------------------------------------
# Statistics (llama.cpp's estimators)
# --------------------------------------------------------------------------------------------


def mean_and_uncertainty(values) -> tuple[float, float]:
    """Mean and standard error of the mean, as llama.cpp computes them (0 for <= 10 values)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 1:
        return 0.0, 0.0
    mean = float(v.mean())
    var = float((v * v).mean() - mean * mean)
    unc = math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0
    return mean, unc


def percentile(values, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation between the sorted neighbours."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if len(v) == 0:
        return float("nan")
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * v[i] + p * v[min(i + 1, len(v) - 1)])


def median(values) -> float:
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n == 0:
        return float("nan")
    return float(v[n // 2] if n % 2 else 0.5 * (v[n // 2] + v[n // 2 - 1]))


def perplexity_summary(nll) -> dict:
    """PPL of the scored tokens with its uncertainty."""
    mean, unc = mean_and_uncertainty(nll)
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_unc": ppl * unc, "mean_nll": mean, "scored_tokens": len(nll)}


def quality_summary(per_token: dict) -> dict:
    """The table of llama.cpp's perplexity README for one model against its reference."""
    nll, nll_base = per_token["nll"], per_token["nll_base"]
    n = len(nll)
    (m, u), (mb, ub) = mean_and_uncertainty(nll), mean_and_uncertainty(nll_base)
    cov = 0.0
    if n >= 10:
        cov = float((np.mean(nll * nll_base) - np.mean(nll) * np.mean(nll_base)) / (n - 1))
    ln_ratio = m - mb
    ln_ratio_unc = math.sqrt(max(u * u + ub * ub - 2 * cov, 0.0))
    ppl, ppl_base = math.exp(m), math.exp(mb)
    kld = np.asarray(per_token["kld"], dtype=np.float64)
    kld_mean, kld_unc = mean_and_uncertainty(kld)
    same = float(np.mean(per_token["same_top"])) if n else float("nan")
    p_diff = np.asarray(per_token["p_diff"], dtype=np.float64)
    mse, mse_unc = mean_and_uncertainty(p_diff * p_diff)
    rms = math.sqrt(mse)
    return {
        "ppl": ppl,
        "ppl_unc": ppl * u,
        "ppl_base": ppl_base,
        "ppl_base_unc": ppl_base * ub,
        "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_unc": ln_ratio_unc,
        "ppl_ratio": math.exp(ln_ratio),
        "ppl_ratio_unc": math.exp(ln_ratio) * ln_ratio_unc,
        "kld_mean": kld_mean,
        "kld_unc": kld_unc,
        "kld_median": median(kld),
        "kld_p90": percentile(kld, 0.90),
        "kld_p99": percentile(kld, 0.99),
        "kld_p999": percentile(kld, 0.999),
        "kld_max": float(kld.max()) if n else float("nan"),
        "same_top_pct": 100 * same,
        "same_top_unc_pct": 100 * math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        "p_diff_mean_pct": 100 * float(p_diff.mean()) if n else float("nan"),
        "p_diff_rms_pct": 100 * rms,
        "p_diff_rms_unc_pct": 100 * (0.5 / rms * mse_unc) if rms > 0 else 0.0,
        "scored_tokens": n,
    }


def identity_summary(nll) -> dict:
    """The reference against itself: its own PPL, ratio 1, KLD 0, same top 100 %."""
    summary = perplexity_summary(nll)
    return {
        "ppl": summary["ppl"],
        "ppl_unc": summary["ppl_unc"],
        "ppl_base": summary["ppl"],
        "ppl_base_unc": summary["ppl_unc"],
        "ln_ppl_ratio": 0.0,
        "ln_ppl_ratio_unc": 0.0,
        "ppl_ratio": 1.0,
        "ppl_ratio_unc": 0.0,
        **dict.fromkeys(("kld_mean", "kld_unc", "kld_median", "kld_p90", "kld_p99"), 0.0),
        **dict.fromkeys(("kld_p999", "kld_max"), 0.0),
        "same_top_pct": 100.0,
        "same_top_unc_pct": 0.0,
        "p_diff_mean_pct": 0.0,
        "p_diff_rms_pct": 0.0,
        "p_diff_rms_unc_pct": 0.0,
        "scored_tokens": summary["scored_tokens"],
    }


@dataclass
class Accumulator:
    """Collects per-token arrays chunk by chunk."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, per_token: dict) -> None:
        for key, value in per_token.items():
            self.parts.setdefault(key, []).append(np.asarray(value))

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(values) for key, values in self.parts.items()}


# --------------------------------------------------------------------------------------------
# The base file (llama-perplexity --kl-divergence-base format)
# --------------------------------------------------------------------------------------------


class BaseFileWriter:
    """Writes a reference's log-probs chunk by chunk, in llama-perplexity's base-file format:
    ``_logits_``, n_ctx (u32), n_vocab (i32), n_chunk (i32), the chunks' tokens (i32), then per
    chunk ``scored_per_chunk(n_ctx)`` records of ``record_width(n_vocab)`` uint16."""

    def __init__(self, path: str | os.PathLike, n_vocab: int, chunks: np.ndarray) -> None:
        self.path = Path(path)
        self.n_vocab = n_vocab
        self.n_chunk, self.n_ctx = chunks.shape
        self.written = 0
        self._fh = open(self.path, "wb")  # noqa: SIM115  (closed in close())
        self._fh.write(MAGIC)
        self._fh.write(np.array([self.n_ctx], dtype="<u4").tobytes())
        self._fh.write(np.array([n_vocab, self.n_chunk], dtype="<i4").tobytes())
        self._fh.write(np.ascontiguousarray(chunks, dtype="<i4").tobytes())

    def write_chunk(self, logits: np.ndarray) -> None:
        """``logits``: the ``scored_per_chunk(n_ctx)`` scored rows of one chunk, ``[T, V]``."""
        expected = (scored_per_chunk(self.n_ctx), self.n_vocab)
        if tuple(logits.shape) != expected:
            raise ValueError(f"chunk logits {logits.shape}, expected {expected}")
        self._fh.write(encode_logprobs(logits).astype("<u2").tobytes())
        self.written += 1

    def close(self) -> None:
        self._fh.close()
        if self.written != self.n_chunk:
            raise ValueError(f"{self.path}: {self.written} of {self.n_chunk} chunks written")


@dataclass(frozen=True)
class BaseFile:
    """A base file opened read-only (records memory-mapped)."""

    n_ctx: int
    n_vocab: int
    chunks: np.ndarray  # [n_chunk, n_ctx] int32
    records: np.ndarray  # [n_chunk, scored_per_chunk, record_width] uint16 (memmap)

    @property
    def n_chunk(self) -> int:
        return len(self.chunks)


def read_base_file(path: str | os.PathLike) -> BaseFile:
    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(8) != MAGIC:
            raise ValueError(f"{path}: not a llama-perplexity log-probability file")
        n_ctx = int(np.frombuffer(fh.read(4), dtype="<u4")[0])
        n_vocab, n_chunk = (int(x) for x in np.frombuffer(fh.read(8), dtype="<i4"))
        chunks = np.frombuffer(fh.read(4 * n_ctx * n_chunk), dtype="<i4").reshape(n_chunk, n_ctx)
    offset = 20 + 4 * n_ctx * n_chunk
    shape = (n_chunk, scored_per_chunk(n_ctx), record_width(n_vocab))
    expected = offset + 2 * int(np.prod(shape))
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {expected} (truncated?)")
    records = np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=shape)
    return BaseFile(n_ctx, n_vocab, chunks.astype(np.int32), records)
