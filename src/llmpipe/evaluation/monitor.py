"""What a job used: peak resident memory (host) and peak GPU memory (via nvidia-smi)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading


def peak_rss_mb() -> float:
    """Peak resident set of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _process_gpu_mb(pid: int) -> float | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0.0
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].replace(".", "", 1).isdigit():
            used += float(parts[1])
    return used


class GpuMemorySampler:
    """Polls this process's GPU memory while active (llama.cpp exposes no allocator stats).

    ``peak_mb`` stays None when there is no NVIDIA driver or the process uses no GPU.
    """

    def __init__(self, interval_s: float = 0.5, enabled: bool = True) -> None:
        self.interval_s = interval_s
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        if not self.enabled:
            return
        used = _process_gpu_mb(os.getpid())
        if used:
            self.peak_mb = max(self.peak_mb or 0.0, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> GpuMemorySampler:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
