"""What a step runs on: a GPU type of the config's ``hardware.gpus`` table, or a CPU node.

The same table is the roofline of evaluation runs: ``bandwidth_table`` maps the part of a GPU's
name that the driver reports to its peak memory bandwidth (``llmpipe.evaluation.bandwidth``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmpipe.errors import ConfigError
from llmpipe.estimate.formats import normalize_format


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


def gpu(name: str, entry: Mapping[str, Any]) -> Hardware:
    """A GPU type from one entry of config ``hardware.gpus``: ``memory_gb`` (GiB per GPU),
    ``bandwidth_gb_s``, ``tflops_f16`` (tensor-core peak), ``tflops_f32``, ``bf16``.

    The achieved fractions are the same for every GPU: 30% of peak FLOPs is a typical HF
    training/prefill figure, decode reaches about 60% of bandwidth; ``overhead_mb`` covers the
    CUDA context, cuBLAS workspace and caching-allocator slack per GPU. Without bf16 tensor
    cores bf16 math runs at about fp32 speed.
    """
    try:
        return Hardware(
            name=name,
            is_gpu=True,
            mem_mb=int(entry["memory_gb"] * 1024),
            flops_f16=entry["tflops_f16"] * 1e12,
            flops_f32=entry["tflops_f32"] * 1e12,
            mem_bw=entry["bandwidth_gb_s"] * 1e9,
            compute_efficiency=0.30,
            bandwidth_efficiency=0.60,
            overhead_mb=1024,
            layer_overhead_s=1.5e-4,
            native_bf16=bool(entry.get("bf16", False)),
        )
    except KeyError as err:
        raise ConfigError(f"hardware.gpus.{name}: missing key {err.args[0]!r}") from None


# The library's default GPU, as config ``hardware.gpus.v100d32q`` (the cluster's V100-32GB
# vGPU profile; the SXM2 V100's figures: no TF32, no bf16 tensor cores, HBM2).
V100 = gpu(
    "v100d32q",
    {"memory_gb": 32, "bandwidth_gb_s": 900, "tflops_f16": 125, "tflops_f32": 15.7, "bf16": False},
)


def cpu(
    cores: int = 2,
    gflops_per_core: float = 50.0,
    mem_bw_gb_s: float = 20.0,
    mem_gb: float = 8.0,
    compute_efficiency: float = 0.30,
) -> Hardware:
    """A CPU-only machine; the defaults (config ``hardware.cpu``) describe a 2-core laptop.

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


def planned_gpu(section: Mapping[str, Any], gpu_type: str) -> Hardware:
    """The GPU type ``gpu_type`` (config ``slurm.gpu_type``) of config ``hardware.gpus``."""
    gpus = section["gpus"]
    if gpu_type not in gpus:
        raise ConfigError(
            f"slurm.gpu_type: {gpu_type!r} has no entry in hardware.gpus "
            f"(known: {', '.join(sorted(gpus))}); add its memory, bandwidth and TFLOPS there"
        )
    return gpu(gpu_type, gpus[gpu_type])


def planned_cpu(section: Mapping[str, Any], cores: int) -> Hardware:
    """A CPU node of ``cores`` cores with the figures of ``hardware.cpu``."""
    entry = section["cpu"]
    return cpu(cores, entry["gflops_per_core"], entry["bandwidth_gb_s"], entry["memory_gb"])


def bandwidth_table(section: Mapping[str, Any]) -> dict[str, float]:
    """The roofline table: the part of each GPU's reported name (``match``, default the key)
    -> its peak memory bandwidth in GB/s."""
    return {
        str(entry.get("match") or name): float(entry["bandwidth_gb_s"])
        for name, entry in section["gpus"].items()
    }
