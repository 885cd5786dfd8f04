"""The estimator's results: ``Estimate`` (one step's prediction, ready to become a rule's
resources), ``GpuFit`` (a GPU count for a memory need), and the two ways every step builds its
estimate: ``host_estimate`` (a host process) and ``place`` (a step that may run on GPUs)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from llmpipe.constants import GIB, MIB
from llmpipe.errors import ConfigError, ResourceError
from llmpipe.estimate.assumptions import DEFAULTS, Assumptions
from llmpipe.estimate.hardware import V100, Hardware


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


def host_mb(peak_bytes: float, a: Assumptions) -> int:
    return math.ceil(peak_bytes * a.mem_margin / MIB)


def _runtime_min(seconds: float, a: Assumptions) -> int:
    return max(a.min_runtime_min, math.ceil(seconds * a.runtime_margin / 60))


def mb_s(value: float) -> float:
    """Bytes per second of a throughput in MB/s."""
    return value * 1e6


def host_estimate(
    step: str,
    a: Assumptions,
    *,
    peak: float,
    seconds: float,
    disk: float = 0,
    fits: bool = True,
    notes: Sequence[str] = (),
    detail: Mapping[str, float] | None = None,
) -> Estimate:
    """The estimate of a step whose host process peaks at ``peak`` bytes and runs ``seconds``:
    both requested with the margins of ``a``; ``disk`` bytes written. ``detail`` gets the raw
    ``runtime_s`` and ``host_peak_bytes``."""
    return Estimate(
        step=step,
        mem_mb=host_mb(peak, a),
        runtime_min=_runtime_min(seconds, a),
        fits=fits,
        disk_mb=math.ceil(disk / MIB),
        notes=tuple(notes),
        detail={**(detail or {}), "runtime_s": seconds, "host_peak_bytes": peak},
    )


def place(
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
    """Put a GPU-capable step on ``hw``: on a GPU, shard ``shardable`` bytes across the fewest
    GPUs that fit (``replicated`` on each; the host holds ``host_gpu_job``); on a CPU, everything
    is host memory and must fit in its RAM."""
    notes = list(notes)
    if not hw.is_gpu:
        peak = host_gpu_job + shardable + replicated
        usable = hw.mem_mb * MIB * (1 - a.gpu_headroom)
        if peak > usable:
            notes.insert(
                0,
                f"needs {peak / GIB:.1f} GiB, more than {usable / GIB:.1f} GiB usable of the "
                "CPU's RAM",
            )
        return host_estimate(
            step, a, peak=peak, seconds=seconds, disk=disk, fits=peak <= usable, notes=notes,
            detail=detail,
        )  # fmt: skip
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
    on_host = host_estimate(
        step, a, peak=host_gpu_job, seconds=seconds, disk=disk, fits=fit.fits, notes=notes,
        detail=detail,
    )  # fmt: skip
    return replace(
        on_host,
        gpus=fit.gpus if fit.gpus is not None else a.max_gpus,
        gpu_mem_mb=fit.per_gpu_mb,
    )
