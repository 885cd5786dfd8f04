"""panel_gemm, the CPU decode step's matmul kernel: built from source, checked against torch."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmpipe.errors import ConfigError  # noqa: E402
from llmpipe.evaluation import panel_gemm  # noqa: E402
from llmpipe.evaluation.decoders import OneDNNMatmul, cpu_matmul  # noqa: E402

KERNEL, WHY = panel_gemm.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"panel_gemm cannot run here: {WHY}")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_torch(rows, threads):
    """Every tile height (1-6 rows, then groups of 6), a last panel that is not full
    (N = 2 x 16 + 8), an odd K, bias and residual terms, one and two threads."""
    generator = torch.Generator().manual_seed(rows)
    n, k = 40, 37
    weight = torch.randn(n, k, generator=generator)
    bias = torch.randn(n, generator=generator)
    x = torch.randn(rows, k, generator=generator)
    residual = torch.randn(rows, n, generator=generator)
    packed = KERNEL.pack(weight)
    assert tuple(packed.data.shape) == (3, k, 16) and packed.n_out == n
    assert packed.data[2, :, 8:].abs().sum() == 0  # columns past N are zero
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b, r in ((None, None), (bias, None), (None, residual), (bias, residual)):
            expected = x @ weight.T
            expected = expected + (b if b is not None else 0) + (r if r is not None else 0)
            got = KERNEL.linear(x, packed, b, r)
            assert got.shape == (rows, n)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_kernel_and_onednn_agree_on_a_decoder_sized_matrix():
    """SmolLM2's gate/up shape, 6 rows: both matmuls give the same product to fp32 rounding."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 576, generator=generator)
    x = torch.randn(6, 576, generator=generator)
    expected = (x.double() @ weight.double().T).float()
    got = KERNEL.linear(x, KERNEL.pack(weight))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if OneDNNMatmul.available():
        onednn = OneDNNMatmul(6)
        torch.testing.assert_close(onednn.linear(x, onednn.pack(weight)), got)


@needs_kernel
def test_kernel_runs_on_torchs_own_thread_pool(tmp_path, monkeypatch):
    """Loading a fresh copy of the kernel maps no new OpenMP runtime: its libgomp.so.1 is
    torch's (two pools would fight for the cores)."""
    before = panel_gemm.loaded_openmp_libraries()
    assert any("torch" in path and "libgomp" in path for path in before), before
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel, note = panel_gemm.load.__wrapped__()
    assert kernel is not None, note
    assert str(kernel.path) in Path("/proc/self/maps").read_text()
    assert panel_gemm.loaded_openmp_libraries() == before


@needs_kernel
def test_kernel_refuses_mismatched_shapes():
    packed = KERNEL.pack(torch.randn(16, 8))
    with pytest.raises(ValueError, match="panel_gemm"):
        KERNEL.linear(torch.randn(2, 9), packed)
    with pytest.raises(ValueError, match="residual"):
        KERNEL.linear(torch.randn(2, 8), packed, None, torch.randn(3, 16))
    with pytest.raises(ValueError, match="bias"):
        KERNEL.linear(torch.randn(2, 8), packed, torch.randn(15))


@needs_kernel
def test_kernel_builds_into_a_fresh_cache(tmp_path, monkeypatch):
    """A machine that never built it compiles it into its cache (and loads that copy)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel, note = panel_gemm.load.__wrapped__()
    assert kernel is not None, note
    assert kernel.path.parent == tmp_path / "llmpipe" / "kernels" and kernel.path.is_file()
    assert list(kernel.path.parent.iterdir()) == [kernel.path]  # no temporary left behind


def test_no_compiler_means_onednn_with_the_reason(tmp_path, monkeypatch):
    """auto falls back to oneDNN and says why; panel insists and stops with one error."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(panel_gemm, "load", panel_gemm.load.__wrapped__)
    kernel, why = panel_gemm.load()
    assert kernel is None
    if OneDNNMatmul.available():
        matmul, note = cpu_matmul("auto", 4)
        assert isinstance(matmul, OneDNNMatmul) and "oneDNN" in note
        assert cpu_matmul("onednn", 4)[1].startswith("oneDNN matmul")
    if "compiler" in why:  # (on a machine without AVX2 the reason is that instead)
        assert "'no-such-compiler' not on PATH" in why
        with pytest.raises(ConfigError, match=r"cpu_matmul: panel, but .*no-such-compiler"):
            cpu_matmul("panel", 4)


@pytest.mark.fault(
    "evaluate.transformers.cpu_matmul not one of auto, panel, onednn",
    "evaluate.transformers.cpu_matmul: 'mkl' is not one of",
)
def test_an_unknown_matmul_is_refused():
    with pytest.raises(ConfigError, match="evaluate.transformers.cpu_matmul: 'mkl' is not one of"):
        cpu_matmul("mkl", 4)


@needs_kernel
def test_a_second_openmp_runtime_would_be_seen():
    """The guard above can fail: in a process without torch, loading the kernel maps the
    system's libgomp, and ``loaded_openmp_libraries`` reports it."""
    import subprocess
    import sys

    code = (
        "import ctypes; from llmpipe.evaluation import panel_gemm as p; "
        "before = p.loaded_openmp_libraries(); "
        f"ctypes.CDLL({str(KERNEL.path)!r}); "
        "print(sorted(p.loaded_openmp_libraries() - before))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "libgomp" in done.stdout and "torch" not in done.stdout
