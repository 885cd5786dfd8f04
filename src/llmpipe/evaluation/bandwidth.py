"""Peak memory bandwidth: the roofline that decode speed is compared with.

- On a GPU the figure comes from the config table ``hardware.gpus`` (device name substring ->
  GB/s, ``llmpipe.estimate.hardware.bandwidth_table``), matched against the name the driver
  reports.
- On a CPU it is measured: ``probe`` streams a buffer much larger than the last-level cache with
  ``threads`` threads at once (each reduces its own slice with ``numpy.max``, a vectorised kernel
  that releases the GIL and reads at memory speed) and keeps the best of several passes. The
  workflow runs it once per host (rule ``bandwidth_probe``; a job on another host probes its own
  host once and caches the result, see ``host_bandwidth``).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from llmpipe import atomic

GB = 1e9
BLOCK = 32 * 1024 * 1024  # bytes reduced per call (keeps every call long against its overhead)


def probe(threads: int, size_mb: int = 1024, repetitions: int = 7) -> dict:
    """Multi-threaded read bandwidth of this host in GB/s (best and median of the passes)."""
    threads = max(1, int(threads))
    nbytes = max(size_mb, 64) * 1024 * 1024
    buf = np.ones(nbytes, dtype=np.uint8)  # written once, so every page is really allocated
    slices = np.array_split(buf, threads)
    barrier = threading.Barrier(threads + 1)
    results: list[float] = []

    def reader(part: np.ndarray) -> None:
        for _ in range(repetitions + 1):
            barrier.wait()
            for start in range(0, len(part), BLOCK):
                part[start : start + BLOCK].max()
            barrier.wait()

    workers = [threading.Thread(target=reader, args=(part,), daemon=True) for part in slices]
    for worker in workers:
        worker.start()
    for rep in range(repetitions + 1):
        barrier.wait()
        start = time.perf_counter()
        barrier.wait()
        if rep:  # the first pass warms up (page tables, frequency)
            results.append(nbytes / (time.perf_counter() - start) / GB)
    for worker in workers:
        worker.join()
    return {
        "gb_s": round(max(results), 3),
        "median_gb_s": round(statistics.median(results), 3),
        "passes_gb_s": [round(r, 3) for r in results],
        "threads": threads,
        "size_mb": size_mb,
        "method": "numpy max over a uint8 buffer, one slice per thread, best pass",
        "host": socket.gethostname(),
        "measured_at": time.time(),
    }


def write_probe(out: str | os.PathLike, threads: int, size_mb: int, repetitions: int) -> dict:
    record = probe(threads, size_mb, repetitions)
    atomic.write_json(out, record)
    return record


def host_bandwidth(
    workflow_probe: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    threads: int,
    size_mb: int = 1024,
    repetitions: int = 7,
) -> dict:
    """This host's probe: the workflow's when it ran here with these threads, else a cached
    per-host one (``<cache_dir>/<host>-t<threads>.json``), measured once under a lock."""
    host = socket.gethostname()
    if workflow_probe and Path(workflow_probe).is_file():
        record = json.loads(Path(workflow_probe).read_text())
        if record.get("host") == host and record.get("threads") == threads:
            return record
    cached = Path(cache_dir) / f"{host}-t{threads}.json"
    with atomic.file_lock(Path(cache_dir) / f".{host}-t{threads}.lock"):
        if cached.is_file():
            return json.loads(cached.read_text())
        return write_probe(cached, threads, size_mb, repetitions)


def table_bandwidth(device_name: str, table: dict[str, float]) -> float | None:
    """The configured peak of a GPU, by the longest table key contained in its name."""
    name = device_name.lower()
    hits = [key for key in table if key.lower() in name]
    return float(table[max(hits, key=len)]) if hits else None
