"""Tunable factors of the estimator (margins, throughputs, process baselines) and their two
sets: ``DEFAULTS`` (generic) and ``CALIBRATED`` (what the workflow's rules plan with)."""

from __future__ import annotations

from dataclasses import dataclass, replace


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

# The CPU steps' process baselines, calibrated on the peaks the workflow's own jobs record as
# "measured" (llmpipe.monitor's sampled RSS and the kernel's ru_maxrss) for the default run. Each
# step runs as a Snakemake `script:`, whose preamble (unpickling the `snakemake` object) is part
# of every baseline.
CALIBRATED = replace(
    DEFAULTS,
    fetch_host_mb=245,  # the preamble + transformers' config table (imports torch)
    dequantize_host_mb=400,  # torch + transformers' model code and gguf, before any weight
    stage_host_mb=130,  # the preamble + copy buffers (the RAM-disk bytes come on top)
    convert_host_mb=370,  # the preamble + the converter's imports: torch CPU, numpy, gguf-py
    convert_tensor_bytes=4.0,  # f16 -> f16 is not cast through f32
    quantize_host_mb=145,  # the preamble + libllama
    # llama.cpp allocates 8 B/weight but touches 4 (the f32 conversion) + the output's bytes.
    quantize_buffer_bytes=5.0,
    llama_cpp_cpu_host_mb=145,  # as quantize: the preamble + libllama
    torch_cpu_host_mb=400,  # as the packaged download's process: torch + model code on a CPU
)
