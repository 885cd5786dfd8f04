"""The ``evaluate_placement`` rule: one GGUF on one placement (the guide's comparison of a model
on the CPU, one GPU, several GPUs and several hosts), timed with llama-bench's two tests.

A placement (config ``evaluate.placements.list``) names the threads, the GPUs per host, the
hosts and how several GPUs split the model. Several hosts go through llama.cpp's RPC backend
(``rpc``): inside a Slurm allocation of that many nodes one ``rpc-server`` per node, elsewhere
that many servers on 127.0.0.1 (``where: local``: the RPC path, not a network). Whether this
machine's llama.cpp can run a placement at all is decided when the run is planned
(``why_not``), so a GPU placement on a CPU-only build is listed as not run, with the reason,
instead of failing halfway.

One record per job: ``results/eval/<model>/placements/<name>.json`` with prefill and decode
tok/s (mean and sd over the repetitions), load time, GB moved (the weights loaded onto the
placement's devices) and load GB/s, the devices and servers, and the provenance.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmpipe import atomic, paths, provenance
from llmpipe import config as cfg
from llmpipe.errors import ConfigError

GB = 1e9


@dataclass(frozen=True)
class Placement:
    """One entry of ``evaluate.placements.list`` (schema defaults for what it leaves out)."""

    name: str
    threads: int | None = None
    gpus: int = 0
    hosts: int = 1
    split_mode: str = "layer"
    tensor_split: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, item: dict) -> Placement:
        fields = {k: v for k, v in item.items() if k in cls.__dataclass_fields__}
        if fields.get("tensor_split") is not None:
            fields["tensor_split"] = tuple(float(x) for x in fields["tensor_split"])
        return cls(**fields)

    @property
    def offloads(self) -> bool:
        """Whether the layers leave this host's CPU: to GPUs, or to RPC servers."""
        return self.gpus > 0 or self.hosts > 1

    def describe(self) -> str:
        hosts = f"{self.hosts} hosts" if self.hosts > 1 else "1 host"
        devices = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}" if self.gpus else "CPU"
        split = f", {self.split_mode} split" if self.gpus > 1 else ""
        threads = (
            f", {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else ""
        )
        return f"{hosts} x {devices}{split}{threads}"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["tensor_split"] = list(self.tensor_split) if self.tensor_split else None
        return out


def placements(section: dict) -> list[Placement]:
    """The configured placements; names must be unique (each is a file)."""
    items = section.get("list", cfg.defaults("evaluate.placements")["list"])
    out = [Placement.from_config(item) for item in items]
    seen: set[str] = set()
    for p in out:
        if p.name in seen:
            raise ConfigError(f"evaluate.placements.list: name {p.name!r} appears twice")
        seen.add(p.name)
    return out


# llama.cpp's backends that are not a GPU (llama_supports_gpu_offload() is true for RPC too).
NOT_GPU_BACKENDS = {"CPU", "RPC", "BLAS"}
GPU_FLAG = re.compile(r"-DGGML_(CUDA|HIP|MUSA|SYCL|VULKAN|METAL)=(ON|1|TRUE|YES)\b", re.I)
RPC_FLAG = re.compile(r"-DGGML_RPC=(ON|1|TRUE|YES)\b", re.I)


def gpu_build() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA …): decided from the build, not
    from this machine's devices, so a login node without a GPU plans GPU placements too. The
    planner asks on every parse of the Snakefile: the flags setup recorded (a file read) when
    there are any, else the loaded library's backend registries."""
    flags = paths.llama_build_flags()
    if flags is not None:
        return bool(GPU_FLAG.search(flags))
    from llmpipe.evaluation import rpc

    return any(name not in NOT_GPU_BACKENDS for name in rpc.backend_registries())


def rpc_build() -> bool:
    flags = paths.llama_build_flags()
    if flags is not None:
        return bool(RPC_FLAG.search(flags))
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def why_not(placement: Placement, *, gpus_available: bool, rpc_available: bool) -> str | None:
    """Why this run cannot measure ``placement`` (None: it can)."""
    if placement.gpus and not gpus_available:
        return (
            f"needs {placement.gpus} GPU(s) per host: this llama.cpp build has no GPU backend "
            "(LLMPIPE_CUDA=1 tools/setup.sh on the cluster)"
        )
    if placement.hosts > 1 and not rpc_available:
        return "needs llama.cpp's RPC backend: rebuild with LLMPIPE_RPC=1 tools/setup.sh"
    return None


@contextlib.contextmanager
def _servers(placement: Placement, threads: int, log_dir: str | None):
    """The RPC servers of a placement of several hosts (none for one host), and where."""
    from llmpipe.evaluation import rpc

    if placement.hosts <= 1:
        yield [], "this host"
        return
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or 0)
    if nodes >= placement.hosts:
        with rpc.slurm_servers(threads, log_dir) as servers:
            yield servers[: placement.hosts], "slurm"
    else:
        # The "hosts" share this machine's cores: each server gets its share (llama.cpp's
        # threads spin at every barrier, so more threads than cores is many times slower).
        share = max(1, threads // placement.hosts)
        with rpc.local_servers(placement.hosts, share, log_dir) as servers:
            yield servers, "local"


def run_placement(
    *,
    model_id: str,
    variant: str,
    gguf: str,
    placement: Placement,
    settings: dict,
    threads: int,
    n_prompt: int,
    n_gen: int,
    repetitions: int,
    out_json: str,
    log_dir: str | None = None,
) -> dict[str, Any]:
    """Load ``gguf`` on ``placement``, run llama-bench's pp and tg tests, write the record."""
    from llmpipe.evaluation import llama_backend as lb
    from llmpipe.evaluation import rpc

    n_threads = placement.threads or threads
    section = {
        **settings,
        "n_threads": n_threads,
        "n_threads_batch": n_threads,
        "n_gpu_layers": -1 if placement.offloads else 0,
        "split_mode": placement.split_mode if placement.gpus > 1 else settings.get("split_mode"),
        "tensor_split": list(placement.tensor_split) if placement.tensor_split else None,
        "tune_threads": False,
    }
    section = {k: v for k, v in section.items() if v is not None}
    llama = lb.LlamaSettings.from_config(section, n_threads)
    size = Path(gguf).stat().st_size
    with _servers(placement, n_threads, log_dir) as (servers, where):
        endpoints = [s.endpoint for s in servers]
        if endpoints:
            rpc.register(endpoints)
        start = time.perf_counter()
        llm = lb.load(gguf, llama, n_ctx=max(n_prompt + n_gen, 64), n_batch=max(n_prompt, 1))
        load_s = time.perf_counter() - start
        try:
            result = lb.bench(llm, n_prompt, n_gen, repetitions)
        finally:
            llm.close()
        devices = [f"{n} ({d})" for n, d in rpc.devices()] if endpoints else None
    record = {
        "model": model_id,
        "variant": variant,
        "gguf": str(gguf),
        "placement": placement.as_dict(),
        "description": placement.describe(),
        "where": where,
        "servers": endpoints,
        "nodes": [s.node for s in servers],
        "devices": devices,
        "threads": n_threads,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "repetitions": repetitions,
        "load_s": round(load_s, 4),
        "gb_moved": round(size / GB, 4),
        "load_gb_per_s": round(size / GB / load_s, 3) if load_s > 0 else None,
        **{k: (round(v, 3) if v is not None else None) for k, v in result.items()},
        "settings": llama.as_dict(),
        "provenance": provenance.collect(),
    }
    atomic.write_json(out_json, record)
    return record
