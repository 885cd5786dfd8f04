"""Fail fast on the wrong hardware: a job configured for a GPU, or granted one, checks before
any work that the GPU is there and that the library it will run on can use it.

A Slurm job that lands on a node without a usable GPU (no ``--gres``, ``CUDA_VISIBLE_DEVICES``
empty, a broken driver), a CPU-only torch, or a llama.cpp built without CUDA while
``n_gpu_layers`` is not 0 would otherwise run, slowly, on the CPU inside a GPU allocation. Here
it stops with one line naming the rule, the node and the fix.

llama.cpp's check asks the ggml device list (``provenance.llama_cpp_devices``) for a GPU:
``llama_supports_gpu_offload()`` alone is true for any build with the RPC backend, and ours has
it on.

The scripts call ``check`` through ``llmpipe.script.logged(..., gpu=need)``; ``need_for_eval``
and ``need_for_torch`` say what a job needs from its rule's gres and settings.

Test-only switch: ``LLMPIPE_TEST_FAKE_GRES=1`` in a job's environment skips the check (and says
so in the log), so that the Slurm tests can keep checking ``--gres`` on a GPU-less machine whose
"GPU" is a stand-in device. Nothing in the workflow or the profiles sets it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

from llmpipe.errors import ResourceError

FAKE_GRES_ENV = "LLMPIPE_TEST_FAKE_GRES"
LLAMA_FIX = (
    "build llama.cpp with CUDA on a GPU node (module load cuda; LLMPIPE_CUDA=1 "
    "LLMPIPE_CUDA_ARCH=70 tools/setup.sh, README 'GPU nodes'), or set "
    "evaluate.llama_cpp.n_gpu_layers: 0"
)
TORCH_FIX = (
    "install the CUDA build of torch from the lock on a GPU node (module load cuda; "
    "LLMPIPE_CUDA=1 tools/setup.sh, README 'GPU nodes'), or configure the step for the CPU"
)
GRES_FIX = (
    "run it through the Slurm profile (the rule asks for --gres=gpu:<slurm.gpu_type>:N) on a "
    "node with a working driver, or configure the step for the CPU"
)


@dataclass(frozen=True)
class Need:
    """What one job needs: torch on CUDA, llama.cpp offloading, and the GPUs it was granted."""

    rule: str
    torch: bool = False
    llama_cpp: bool = False
    granted: int = 0

    @property
    def any(self) -> bool:
        return self.torch or self.llama_cpp or self.granted > 0


def granted_gpus(gres: str | None) -> int:
    """GPUs in a gres string: ``gpu:v100d32q:2`` -> 2, ``gpu:1`` -> 1, ``""`` -> 0."""
    if not gres:
        return 0
    total = 0
    for part in str(gres).split(","):
        fields = part.strip().removeprefix("gres:").split(":")
        if fields[0] == "gpu":
            last = fields[-1] if len(fields) > 1 else "1"
            total += int(last) if last.isdigit() else 1
    return total


def need_for_eval(rule: str, gres: str | None, backend: str, settings: dict) -> Need:
    """An evaluation job: llama.cpp needs a GPU device when it offloads layers, the
    transformers backend a CUDA torch when configured for ``cuda`` or granted a GPU."""
    granted = granted_gpus(gres)
    if backend == "llama.cpp":
        offload = settings.get("n_gpu_layers", 0)
        layers = offload if isinstance(offload, list) else [offload]
        return Need(rule, llama_cpp=any(n != 0 for n in layers), granted=granted)
    return Need(rule, torch=settings.get("device") == "cuda" or granted > 0, granted=granted)


def need_for_torch(rule: str, gres: str | None, wants_cuda: bool) -> Need:
    """A torch job (fine-tune, compare): CUDA when configured for it or granted a GPU."""
    granted = granted_gpus(gres)
    return Need(rule, torch=wants_cuda or granted > 0, granted=granted)


def _fail(need: Need, why: str, fix: str) -> ResourceError:
    return ResourceError(f"{need.rule} on {socket.gethostname()}: needs a GPU, but {why}; {fix}")


def nvidia_smi() -> tuple[bool, str]:
    """(works, what it said): the driver's own view of the node's GPUs."""
    if shutil.which("nvidia-smi") is None:
        return False, "nvidia-smi is not on PATH (no NVIDIA driver on this node)"
    try:
        done = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"nvidia-smi failed ({err})"
    if done.returncode != 0 or "GPU" not in done.stdout:
        said = (done.stdout + done.stderr).strip().splitlines()
        return False, f"nvidia-smi failed (exit {done.returncode}: {said[-1] if said else ''})"
    return True, done.stdout.strip()


def llama_gpu_devices() -> list[dict[str, str]]:
    """The GPU devices in llama.cpp's ggml device list (empty for a CPU/RPC-only build)."""
    from llmpipe import provenance

    return [d for d in provenance.llama_cpp_devices() if d["type"] in ("gpu", "igpu")]


def check(need: Need) -> dict[str, object]:
    """Raise ``ResourceError`` (one line: rule, node, why, fix) unless every GPU the job needs
    is usable; returns what was checked (for the log)."""
    if not need.any:
        return {"checked": False, "reason": "no GPU configured or granted"}
    if os.environ.get(FAKE_GRES_ENV) == "1":
        return {"checked": False, "reason": f"{FAKE_GRES_ENV}=1 (test-only: a stand-in GPU)"}
    facts: dict[str, object] = {"checked": True, "granted": need.granted}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not re.sub(r"[\s,]", "", visible):
        raise _fail(need, "CUDA_VISIBLE_DEVICES is empty (the job was given no GPU)", GRES_FIX)
    works, said = nvidia_smi()
    if not works:
        raise _fail(need, said, GRES_FIX)
    facts["nvidia_smi"] = said.splitlines()
    if need.torch:
        import torch

        if torch.version.cuda is None:
            raise _fail(need, f"torch {torch.__version__} is a CPU-only build", TORCH_FIX)
        if not torch.cuda.is_available():
            why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
            raise _fail(need, f"{why} (driver too old for it, or no device visible)", GRES_FIX)
        count = torch.cuda.device_count()
        if need.granted and count < need.granted:
            raise _fail(need, f"torch sees {count} of the {need.granted} GPUs granted", GRES_FIX)
        facts["torch_cuda"] = torch.version.cuda
        facts["torch_devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
    if need.llama_cpp:
        devices = llama_gpu_devices()
        if not devices:
            raise _fail(
                need,
                "this llama.cpp build has no GPU backend (its ggml devices: CPU/RPC only) and "
                "n_gpu_layers is not 0",
                LLAMA_FIX,
            )
        facts["llama_cpp_devices"] = [d["description"] for d in devices]
    return facts
