"""What produced a result: package versions, git revision, host and hardware, Slurm job, seeds.

``collect()`` is cheap (no torch import) and is stored under ``"provenance"`` in every record.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from llmpipe.paths import REPO_ROOT, llama_build_flags

PACKAGES = (
    "llmpipe",
    "snakemake",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "llama_cpp_python",
    "gguf",
    "numpy",
    "pandas",
    "lm_eval",  # evaluate.tasks
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def environment_lock() -> dict[str, str] | None:
    """The lock file this Python environment was installed from and its sha256 (written by
    tools/setup.sh into the venv); None for an environment made otherwise."""
    try:
        name, digest = (Path(sys.prefix) / "llmpipe-lock.txt").read_text().split()
    except (OSError, ValueError):
        return None
    return {"file": name, "sha256": digest}


@functools.cache
def git_revision(repo: Path = REPO_ROOT) -> dict[str, object]:
    """The workflow's commit and whether the tree had uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        )
        return {"commit": rev, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx2``, ``fma``, ...); empty where /proc/cpuinfo is absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def total_memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


@functools.cache
def gpus() -> list[dict[str, str]]:
    """GPUs as nvidia-smi reports them (name, memory, driver); empty without a driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        name, mem, driver = (part.strip() for part in line.split(","))
        rows.append({"name": name, "memory": mem, "driver": driver})
    return rows


@functools.cache
def llama_cpp_build() -> dict[str, object]:
    """How the pinned llama.cpp (libraries and tools) was compiled: its CMake flags, and
    whether they enable the CUDA and RPC backends."""
    flags = llama_build_flags()
    words = set((flags or "").split())
    return {
        "flags": flags,
        "cuda": bool(words & {"-DGGML_CUDA=on", "-DGGML_CUDA=ON"}),
        "rpc": bool(words & {"-DGGML_RPC=on", "-DGGML_RPC=ON"}),
    }


_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def llama_cpp_devices() -> list[dict[str, str]]:
    """The devices llama.cpp's backends found in this process (name, description, type).

    A GPU appears only where the build has a GPU backend (CUDA) and the driver shows a device.
    ``llama_supports_gpu_offload()`` cannot tell: it is also true for a CPU build with the RPC
    backend. Imports llama_cpp (loads the libraries).
    """
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    llama_cpp.llama_backend_init()
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        devices.append(
            {
                "name": lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                "description": lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                "type": _DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
            }
        )
    return devices


def cuda_versions() -> dict[str, object]:
    """The CUDA stack this result ran on: the driver and the CUDA version it supports (NVML,
    else nvidia-smi's driver), torch's CUDA where this process imported torch (never imported
    here), and whether llama.cpp is a CUDA build. Nulls on a machine without a driver."""
    out: dict[str, object] = {
        "driver": None,
        "driver_cuda": None,
        "torch_cuda": None,
        "llama_cpp_cuda": llama_cpp_build()["cuda"],
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        version = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        out["driver_cuda"] = f"{version // 1000}.{version % 1000 // 10}"
    except Exception:  # noqa: BLE001 - no NVML library or no driver: nvidia-smi, else nulls
        found = gpus()
        out["driver"] = found[0]["driver"] if found else None
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_cuda"] = torch.version.cuda
    return out


def slurm_job() -> dict[str, str] | None:
    keys = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_PARTITION", "SLURM_JOB_GPUS")
    found = {k.lower(): os.environ[k] for k in keys if k in os.environ}
    return found or None


def collect(seed: int | None = None) -> dict[str, object]:
    """Everything needed to reproduce or compare a result, safe to publish (no env dump)."""
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_mb": total_memory_mb(),
        "gpus": gpus(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm": slurm_job(),
        "git": git_revision(),
        "packages": package_versions(),
        "lock": environment_lock(),
        "llama_cpp_build": llama_cpp_build(),
        "cuda": cuda_versions(),
        "seed": seed,
    }
