"""``llmpipe-estimate``: the table of every step's predicted memory, GPUs and runtime for one
model, from its config.json."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace

from llmpipe.errors import PipelineError
from llmpipe.estimate.assumptions import CALIBRATED, DEFAULTS, Assumptions
from llmpipe.estimate.formats import format_kind, normalize_format
from llmpipe.estimate.hardware import V100, Hardware, cpu
from llmpipe.estimate.inference import evaluate_llama_cpp, evaluate_transformers, imatrix
from llmpipe.estimate.prepare import cache_to_shm, convert_to_gguf, download, quantize
from llmpipe.estimate.shape import ModelShape
from llmpipe.estimate.training import FINETUNE_METHODS, finetune
from llmpipe.estimate.types import Estimate


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
        cache_to_shm(shape, a=a),
        convert_to_gguf(shape, staged=staged, a=a),
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
        choices=("gpu", "cpu"),
        default="gpu",
        help=f"where evaluation and fine-tuning run (gpu: config hardware.gpus.{V100.name})",
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
