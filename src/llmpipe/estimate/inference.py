"""Estimators of inference: evaluation with transformers or llama.cpp, and llama.cpp's
importance matrix (a perplexity pass over calibration text)."""

from __future__ import annotations

import math
from dataclasses import replace

from llmpipe.constants import GIB, KLD_ARRAYS, KLD_BLOCK, MIB, record_width
from llmpipe.errors import ConfigError
from llmpipe.estimate.assumptions import DEFAULTS, Assumptions
from llmpipe.estimate.formats import bytes_per_weight, compute_bytes, format_kind, normalize_format
from llmpipe.estimate.hardware import V100, Hardware
from llmpipe.estimate.shape import ModelShape, checkpoint_dtype, gguf_bytes, weights_bytes
from llmpipe.estimate.types import Estimate, host_mb, mb_s, place


def default_eval_seq_len(shape: ModelShape, new_tokens: int) -> int:
    """Prompt length that fills the context window (capped at 4096) with ``new_tokens``."""
    return max(1, min(shape.context, 4096) - new_tokens)


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
    scored_tokens: int | None = None,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """Evaluation with transformers: ``samples`` prompts of ``seq_len`` tokens (default: fill
    the context, capped at 4096) in batches of ``batch``, each generating ``new_tokens``.

    GPU memory: weights in ``dtype`` (f16/bf16/f32, or bitsandbytes int8/nf4) + KV cache for
    batch x (prompt + new tokens) + the widest layer's transient activations + logits: for every
    position with ``full_logits`` (a perplexity pass keeps them in the dtype, upcast to fp32,
    and a fp32 log-softmax), for the last one only in generation (``full_logits=False``);
    ``scored_tokens``: only that many positions per sequence are scored (compare_finetune
    scores the response): the logits of every position stay in the dtype, and only the scored
    ones are copied out, upcast and log-softmaxed
    + per-GPU CUDA/framework overhead. Layers split across GPUs with ``device_map``.
    Host memory: the process, the checkpoint's memory-mapped pages while it loads (resident,
    from the RAM disk or the page cache) and, for a GPU, one tensor being converted to
    ``dtype``; on a CPU everything, the load and the run one after the other.
    """
    fmt = normalize_format(dtype)
    if format_kind(fmt) == "gguf":
        raise ConfigError(f"transformers dtype {dtype!r}: expected f32/f16/bf16/int8/nf4")
    seq_len = seq_len or default_eval_seq_len(shape, new_tokens)
    b = compute_bytes(fmt)
    weights = weights_bytes(shape, fmt)
    kv = shape.kv_cache_bytes(seq_len + new_tokens, batch, b)
    act = batch * seq_len * shape.inference_activation_bytes_per_token(b, seq_len)
    if full_logits and scored_tokens is not None:
        scored = min(scored_tokens, seq_len)
        upcast = 4 if b < 4 else 0
        logits = batch * shape.vocab * (seq_len * b + scored * (b + upcast + 4))
    else:
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
    load_s = weights / mb_s(a.shm_mb_s if staged else a.storage_mb_s)
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
    checkpoint = weights_bytes(shape, checkpoint_dtype(shape, None))
    running = act + logits + alibi + dequant
    if hw.is_gpu:
        host_gpu_job = base * MIB + checkpoint + shape.largest_tensor_params * b
        shardable, replicated = weights + kv, running
    else:
        # One process holds everything. The checkpoint's mapped pages are let go once it is
        # loaded, before the first token: the peak is the larger of loading and running.
        host_gpu_job = base * MIB
        shardable, replicated = weights + max(checkpoint, kv + running), 0
    return place(
        "evaluate_transformers",
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
    """Evaluation with llama.cpp (all layers offloaded on a GPU; split by layer over GPUs);
    ``batch`` prompts decoded together (``evaluate.llama_cpp.parallel``: that many sequences,
    each with its own ``n_ctx`` cells, a decode step of ``batch`` tokens, every prompt's own
    prompt pass).

    Memory: the GGUF's tensors + KV cache (``kv_type``, f16 by default) + the compute buffer:
    per token of a micro-batch, attention scores (f32, heads x context; none with
    ``flash_attn``) + MLP and residual scratch, and f32 logits for the ``outputs`` positions
    whose logits are wanted per pass (1 in generation; the scored half of a chunk in
    perplexity), which also fill llama.cpp's host output buffer and the caller's copy of it.
    ``kld_chunks``:
    chunks of a reference's log-probs read for the KL-divergence (llama-perplexity's
    ``--kl-divergence-base`` format, uint16 per vocabulary entry, memory-mapped: every page read
    stays resident) and compared in blocks of ``KLD_BLOCK`` positions in float64. ``n_ctx`` is
    the context llama.cpp
    allocates per sequence (default: prompt + new tokens). On a GPU the allocation is what
    counts: KV for ``batch x n_ctx`` cells and a compute buffer reserved for
    ``llama_cpp_ubatch`` tokens, each attending to its own sequence's ``n_ctx`` cells; the file
    is memory-mapped and copied to the GPU (host pages are page cache), so host memory is the
    process (+ the file when staged). On a CPU only pages written count: all ``batch x n_ctx``
    KV cells (llama.cpp clears the whole cache when it makes the context: measured, SmolLM2
    at n_ctx 2048, +137 MiB from 1 to 4 sequences), the scratch of the larger of a prompt pass
    (``seq_len`` tokens, at most a micro-batch) and a decode step (``batch`` tokens), and the
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

    # A sequence's tokens attend to its own cells only (no unified cache): context = n_ctx.
    kv = shape.kv_cache_bytes(allocated, batch, kv_b)
    if hw.is_gpu:  # reserved for the worst case: a full micro-batch, every row's logits
        compute = compute_buffer(a.llama_cpp_ubatch, allocated, a.llama_cpp_ubatch)
    else:  # a prompt's own pass, or a decode step of one token per sequence
        tokens = max(min(a.llama_cpp_ubatch, seq_len), batch)
        compute = compute_buffer(tokens, used, min(tokens, max(outputs, batch)))
    logits_out = 2 * batch * outputs * shape.vocab * 4  # output buffer + the caller's copy
    kld = 0
    if kld_chunks:
        kld = (
            kld_chunks * outputs * record_width(shape.vocab) * 2
            + KLD_BLOCK * shape.vocab * 8 * KLD_ARRAYS
        )
    cells = batch * allocated
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
    load_s = gguf / mb_s(a.shm_mb_s if staged else a.storage_mb_s)
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
    return place(
        "evaluate_llama_cpp",
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
        mem_mb=host_mb(peak, a),
        notes=notes,
        detail={**base.detail, "matrix_bytes": matrix, "host_peak_bytes": peak},
    )
