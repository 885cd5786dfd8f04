"""Measure a step while it runs: process RSS and CPU, and GPU utilisation and memory where CUDA is.

    with ResourceMonitor(interval=0.5) as mon:
        heavy_work()
    record["measured"] = mon.summary()        # peaks, means, samples
    mon.write_timeseries("….tsv")             # the time series, one row per sample

Sampling runs on a daemon thread (psutil for this process and its children; GPU memory of this
process through NVML when ``pynvml`` is importable, else ``nvidia-smi``, else torch.cuda's
counters). The final peak RSS is also taken from the kernel's own high-water mark
(``ru_maxrss``), which a sampler cannot miss.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from llmpipe import atomic


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


class ResourceMonitor:
    """Background sampler of RSS, CPU % and (when present) GPU memory and utilisation."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[dict[str, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="resource-monitor")
        self._proc = psutil.Process()
        self._gpu = _gpu_reader()
        self._t0 = 0.0
        self.wall_s = 0.0

    def __enter__(self) -> ResourceMonitor:
        self._t0 = time.perf_counter()
        self._proc.cpu_percent(None)  # prime the CPU counter
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling (idempotent): one last sample, and ``wall_s`` is fixed. Lets a step
        put its final peaks into the record it writes before the ``with`` block ends."""
        if self._stop.is_set() or not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self._t0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        row: dict[str, float | None] = {
            "t_s": round(time.perf_counter() - self._t0, 3),
            "rss_mb": _tree_rss(self._proc) / 2**20,
            "cpu_pct": self._proc.cpu_percent(None),
        }
        row.update(self._gpu() if self._gpu else {"gpu_mem_mb": None, "gpu_util_pct": None})
        self.samples.append(row)

    def summary(self) -> dict[str, float | int | None]:
        def peak(key: str) -> float | None:
            values = [s[key] for s in self.samples if s.get(key) is not None]
            return round(max(values), 1) if values else None

        def mean(key: str) -> float | None:
            values = [s[key] for s in self.samples if s.get(key) is not None]
            return round(sum(values) / len(values), 1) if values else None

        # ru_maxrss is in KiB on Linux: the kernel's high-water mark for this process.
        self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        sampled = peak("rss_mb") or 0.0
        return {
            "wall_s": round(self.wall_s, 3),
            "peak_rss_mb": round(max(sampled, self_peak, child_peak), 1),
            "mean_cpu_pct": mean("cpu_pct"),
            "peak_gpu_mem_mb": peak("gpu_mem_mb"),
            "mean_gpu_util_pct": mean("gpu_util_pct"),
            "samples": len(self.samples),
            "interval_s": self.interval,
        }

    def write_timeseries(self, path: str | Path) -> None:
        keys = ["t_s", "rss_mb", "cpu_pct", "gpu_mem_mb", "gpu_util_pct"]
        lines = ["\t".join(keys)]
        for s in self.samples:
            lines.append("\t".join("" if s.get(k) is None else f"{s[k]:.2f}" for k in keys))
        atomic.write_text(path, "\n".join(lines) + "\n")


def _nvidia_smi_reader():
    """GPU memory of this process and its children (summed over GPUs) and device 0's
    utilisation, from ``nvidia-smi``; None where there is no NVIDIA driver. It sees what torch's
    counters cannot: llama.cpp's CUDA buffers."""
    if shutil.which("nvidia-smi") is None:
        return None
    me = psutil.Process()

    def query(what: str) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return [[f.strip() for f in line.split(",")] for line in out.strip().splitlines()]

    def read() -> dict[str, float | None]:
        try:
            pids = {me.pid, *(c.pid for c in me.children(recursive=True))}
            used = sum(
                float(mb)
                for pid, mb in query("compute-apps=pid,used_memory")
                if pid.isdigit() and int(pid) in pids and mb.replace(".", "", 1).isdigit()
            )
            util = query("gpu=utilization.gpu")
            pct = float(util[0][0]) if util and util[0][0].isdigit() else None
        except (OSError, subprocess.SubprocessError, psutil.Error):
            return {"gpu_mem_mb": None, "gpu_util_pct": None}
        # In a container nvidia-smi may list no process of ours (other PID namespace): None.
        return {"gpu_mem_mb": used or None, "gpu_util_pct": pct}

    return read


def _gpu_reader():
    """A function returning this job's GPU memory and device 0's utilisation, or None without
    a GPU: NVML (per process), else nvidia-smi (per process), else torch's allocator counters."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        me = psutil.Process()

        def read() -> dict[str, float | None]:
            pids = {me.pid, *(c.pid for c in me.children(recursive=True))}
            used = sum(
                (p.usedGpuMemory or 0)
                for h in handles
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                if p.pid in pids
            )
            util = pynvml.nvmlDeviceGetUtilizationRates(handles[0]) if handles else None
            return {
                "gpu_mem_mb": used / 2**20 or None,
                "gpu_util_pct": float(util.gpu) if util else None,
            }

        if handles:
            return read
    except Exception:  # noqa: BLE001, S110 - no NVML library or no GPU: try nvidia-smi below
        pass
    smi = _nvidia_smi_reader()
    if smi is not None:
        return smi
    torch = sys.modules.get("torch")  # never import torch just to find out there is no GPU
    if torch is not None and torch.cuda.is_available():
        return lambda: {
            "gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
            "gpu_util_pct": None,
        }
    return None
