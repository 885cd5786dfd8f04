"""Estimator of fine-tuning (full, LoRA and QLoRA with AdamW)."""

from __future__ import annotations

from llmpipe.constants import MIB
from llmpipe.errors import ConfigError
from llmpipe.estimate.assumptions import DEFAULTS, Assumptions
from llmpipe.estimate.formats import bytes_per_weight, compute_bytes, format_kind, normalize_format
from llmpipe.estimate.hardware import V100, Hardware
from llmpipe.estimate.shape import ModelShape, checkpoint_dtype, weights_bytes
from llmpipe.estimate.types import Estimate, mb_s, place


def default_train_seq_len(shape: ModelShape) -> int:
    """Training sequence length: the context window, capped at 2048."""
    return min(shape.context, 2048)


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
    b = compute_bytes(fmt)
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
    load_s = (n * b) / mb_s(a.shm_mb_s if staged else a.storage_mb_s)
    seconds = a.startup_s + load_s + compute_s + optimizer_s + dequant_s
    if fmt == "bf16" and not hw.native_bf16:
        notes.append(f"{hw.name} has no bf16 tensor cores: bf16 runs near fp32 speed, prefer f16")
    process_mb = a.framework_host_mb
    if not hw.is_gpu and a.torch_cpu_host_mb is not None:
        process_mb = a.torch_cpu_host_mb
    host_gpu_job = process_mb * MIB + shape.largest_tensor_params * b
    if staged:
        host_gpu_job += weights_bytes(shape, checkpoint_dtype(shape, None))
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
    gc = "on" if gradient_checkpointing else "off"
    return place(
        f"finetune-{method} (gc {gc})",
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
