"""A small fp32 matmul kernel for the CPU decode step (``panel_gemm.c``), built on first use.

A decode step multiplies a handful of rows (the batch's live sequences) by every weight
matrix: the weights stream from memory once and the arithmetic is light. oneDNN and MKL read
them at ~15 GB/s on 2 AVX2 cores where a plain sum reads ~25; the kernel here (weights stored
as 16-column panels, a 6 x 16 register tile) reads them at 19-26. It is compiled once per
machine type with the system C compiler (``$CC``, else ``cc``) into the user's cache
(``$XDG_CACHE_HOME/llmpipe/kernels``) and loaded with ctypes.

``load()`` returns the kernel, or None with the reason when it cannot run here: not x86-64
with AVX2 and FMA, no compiler, the build failed, or torch's thread pool is not libgomp (the
kernel's ``omp parallel`` must run on torch's own pool: loading it may not map a second
OpenMP runtime). The caller then keeps oneDNN and records why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from llmpipe import atomic, provenance
from llmpipe.errors import PipelineError

SOURCE = Path(__file__).with_name("panel_gemm.c")
PANEL = 16
ABI = 1
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


@dataclass(frozen=True)
class Panels:
    """A weight as the kernel reads it: (ceil(N/16), K, 16) floats, and N."""

    data: object
    n_out: int


class PanelGemm:
    """The loaded kernel: ``pack`` a weight once, then ``linear`` as often as needed."""

    name = "panel_gemm"

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._call = library.panel_gemm
        self._call.restype = None
        long, ptr = ctypes.c_long, ctypes.c_void_p
        self._call.argtypes = [ptr, long, long, long, ptr, long, ptr, ptr, long, ptr, long]

    @staticmethod
    def pack(weight) -> Panels:
        """(N, K) fp32 weight -> its panels (columns past N zero)."""
        import torch

        n, k = weight.shape
        count = -(-n // PANEL)
        padded = weight.detach().float()
        if n % PANEL:  # (a copy only when the last panel needs zero columns)
            padded = torch.zeros((count * PANEL, k), dtype=torch.float32)
            padded[:n] = weight.detach()
        return Panels(padded.view(count, PANEL, k).transpose(1, 2).contiguous(), n)

    def linear(self, x, weight: Panels, bias=None, residual=None):
        """``residual + x @ W.T + bias`` (either term optional) for fp32 ``x`` (M, K)."""
        import torch

        x = x.contiguous()
        m, k = x.shape
        n = weight.n_out
        if weight.data.shape[1] != k or x.dtype != torch.float32:
            raise ValueError(f"panel_gemm: x {tuple(x.shape)} {x.dtype} vs W ({n}, {k})")
        y = torch.empty((m, n), dtype=torch.float32)
        if residual is not None:
            residual = residual.contiguous()
            if tuple(residual.shape) != (m, n):
                raise ValueError(f"panel_gemm: residual {tuple(residual.shape)} vs ({m}, {n})")
        if bias is not None:
            bias = bias.contiguous()
            if bias.numel() != n or bias.dtype != torch.float32:
                raise ValueError(f"panel_gemm: bias {tuple(bias.shape)} {bias.dtype} vs ({n},)")
        # The pointers stay valid during the call: x, bias and residual are bound here.
        self._call(
            x.data_ptr(),
            m,
            k,
            k,
            weight.data.data_ptr(),
            n,
            None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(),
            n,
            y.data_ptr(),
            n,
        )
        return y


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmpipe" / "kernels"


@functools.cache
def load() -> tuple[PanelGemm | None, str]:
    """(kernel, note): the kernel and where it came from, or None and why not."""
    why = _unsupported()
    if why:
        return None, why
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return None, f"no C compiler ('{compiler}' not on PATH; set CC)"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    path = cache_dir() / f"panel_gemm-{platform.machine()}-{digest}.so"
    if not path.is_file():
        try:
            _build(compiler, path)
        except PipelineError as exc:
            return None, str(exc)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"cannot build {path}: {exc}"
    runtimes = loaded_openmp_libraries()
    try:
        library = ctypes.CDLL(str(path))
        if library.panel_gemm_abi() != ABI:
            return None, f"{path} is not ABI {ABI}"
    except (OSError, AttributeError) as exc:
        return None, f"cannot load {path}: {exc}"
    # The kernel's libgomp.so.1 must be the one torch runs on (same soname: the loader reuses
    # it). A new runtime would start a second thread pool fighting torch's for the cores.
    added = loaded_openmp_libraries() - runtimes
    if added:
        return None, f"torch's thread pool is not libgomp.so.1 (loading the kernel added {added})"
    return PanelGemm(library, path), f"panel_gemm kernel {path.name}"


def _unsupported() -> str | None:
    import torch

    if platform.machine() not in ("x86_64", "AMD64"):
        return f"CPU architecture {platform.machine()} (the kernel is AVX2)"
    if not {"avx2", "fma"} <= provenance.cpu_flags():
        return "the CPU lacks AVX2/FMA"
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return "torch's thread pool is not OpenMP"
    return None


def loaded_openmp_libraries() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {
        line.split()[-1]
        for line in maps.splitlines()
        if any(name in line.rsplit("/", 1)[-1] for name in names)
    }


def _build(compiler: str, path: Path) -> None:
    """Compile into ``path`` (written atomically: concurrent jobs may build at once)."""
    with atomic.atomic_path(path) as tmp:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(tmp)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise PipelineError(
                f"{compiler} failed to build {SOURCE.name}: {done.stderr.strip()[-300:]}"
            )
