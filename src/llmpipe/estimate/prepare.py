"""Estimators of the host-only steps that prepare a model: download, stage (to the RAM disk),
convert (to GGUF), quantize, and merge (a LoRA adapter into its base)."""

from __future__ import annotations

from llmpipe.constants import GIB, MIB
from llmpipe.errors import ConfigError
from llmpipe.estimate.assumptions import DEFAULTS, Assumptions
from llmpipe.estimate.formats import (
    CONVERTER_OUTTYPES,
    bits_per_weight,
    bytes_per_weight,
    format_kind,
    normalize_format,
)
from llmpipe.estimate.shape import ModelShape, checkpoint_dtype, gguf_bytes, weights_bytes
from llmpipe.estimate.types import Estimate, host_estimate, mb_s

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
    dtype = checkpoint_dtype(shape, dtype)
    size = weights_bytes(shape, dtype)
    notes = [f"{size / GIB:.1f} GiB of {dtype} safetensors (only *.safetensors, not *.bin)"]
    if source == "package":
        base = a.dequantize_host_mb if a.dequantize_host_mb is not None else a.framework_host_mb
        # the f32 model, its copy in ``dtype``, and one dequantized tensor in flight (f32)
        peak = base * MIB + shape.n_params * 4 + size + shape.largest_tensor_params * 4
        seconds = a.startup_s + shape.n_params / a.convert_rate + size / mb_s(a.storage_mb_s)
        notes.append(f"dequantized in memory: the f32 model and its {dtype} copy at once")
    else:
        base = a.fetch_host_mb if a.fetch_host_mb is not None else a.tool_host_mb
        peak = base * MIB
        seconds = a.startup_s + size / mb_s(a.net_mb_s) + size / mb_s(a.hash_mb_s)
    return host_estimate(
        "download", a, peak=peak, seconds=seconds, disk=size, notes=notes,
        detail={"checkpoint_bytes": size},
    )  # fmt: skip


def cache_to_shm(
    shape: ModelShape, *, weights: str | None = None, a: Assumptions = DEFAULTS
) -> Estimate:
    """Copy the model (``weights``: a checkpoint dtype or GGUF type) to the RAM disk and verify.

    tmpfs pages are charged to the memory cgroup of the job that writes them, so Slurm counts
    the staged bytes against the job's ``--mem`` until the files are deleted.
    """
    fmt = (
        checkpoint_dtype(shape, weights) if weights in (None, "auto") else normalize_format(weights)
    )
    size = weights_bytes(shape, fmt)
    seconds = a.startup_s + size / mb_s(a.storage_mb_s) + size / mb_s(a.hash_mb_s)
    base = a.stage_host_mb if a.stage_host_mb is not None else a.tool_host_mb
    peak = size + base * MIB
    notes = [f"RAM disk holds {size / GIB:.1f} GiB ({fmt}), counted in the job's memory"]
    return host_estimate(
        "cache_to_shm", a, peak=peak, seconds=seconds, notes=notes, detail={"shm_bytes": size}
    )


def convert_to_gguf(
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
    src = checkpoint_dtype(shape, source_dtype)
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
        + src_bytes / mb_s(read_mb_s)
        + out_bytes / mb_s(a.storage_mb_s)
        + shape.n_params / a.convert_rate
    )
    notes = [
        f"lazy converter: {a.convert_in_flight} x largest tensor ({largest:,} weights) "
        f"in {src}+f32+{out}",
    ]
    if staged:
        notes.append(f"includes the staged {src_bytes / GIB:.1f} GiB on the RAM disk")
    return host_estimate(
        "convert_to_gguf",
        a,
        peak=peak,
        seconds=seconds,
        disk=out_bytes,
        notes=notes,
        detail={
            "tensor_peak_bytes": tensor_peak,
            "gguf_bytes": out_bytes,
            "source_bytes": src_bytes,
            "shm_bytes": src_bytes if staged else 0,
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
        + src_bytes / mb_s(read_mb_s)
        + out_bytes / mb_s(a.storage_mb_s)
        + shape.n_params / rate
    )
    notes = [f"{quant} ~{bits_per_weight(quant)} bits/weight, {threads} threads"]
    if quant.startswith(("IQ1", "IQ2")):
        notes.append("needs an importance matrix (its computation is not included)")
    return host_estimate(
        "quantize",
        a,
        peak=peak,
        seconds=seconds,
        disk=out_bytes,
        notes=notes,
        detail={
            "buffer_bytes": buffers,
            "gguf_bytes": out_bytes,
            "shm_bytes": src_bytes if staged else 0,
        },
    )


def merge_lora(
    shape: ModelShape,
    *,
    dtype: str = "f16",
    lora_rank: int = 16,
    a: Assumptions = DEFAULTS,
) -> Estimate:
    """PEFT's merge_and_unload of a LoRA adapter into the base, on the CPU, saved as safetensors.

    The base is loaded in ``dtype``; each targeted matrix gets B @ A added in place (one
    matrix-sized f32 delta at a time); saving streams the tensors out. The peak is the model
    once plus the torch process.
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
        + (weights + adapter) / mb_s(a.storage_mb_s)  # read the base and the adapter
        + weights / mb_s(a.storage_mb_s)  # write the merged model
        + weights / mb_s(a.hash_mb_s)  # the manifest's sha256
    )
    return host_estimate(
        "merge_lora",
        a,
        peak=peak,
        seconds=seconds,
        disk=weights,
        notes=[f"{fmt} model {weights / GIB:.2f} GiB on the CPU"],
        detail={"weights_bytes": weights, "delta_bytes": delta},
    )
