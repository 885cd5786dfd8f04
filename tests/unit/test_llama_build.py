"""The pinned llama.cpp build (tools/build_llama_cpp.sh via tools/setup.sh): one compile serves the
Python binding and llama.cpp's own tools, so both run the very same libraries."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import llama_cpp
import pytest

from llmpipe import provenance
from llmpipe.errors import PipelineError
from llmpipe.paths import LLAMA_BIN_DIR, llama_tool

TOOLS = (
    "llama-quantize",
    "llama-imatrix",
    "llama-perplexity",
    "llama-bench",
    "llama-batched-bench",
    "llama-server",
    "rpc-server",
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_binding_loads_the_libraries_of_the_tools_build():
    binding_lib = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
        assert _sha(binding_lib / name) == _sha(LLAMA_BIN_DIR / name), name


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_runs_from_the_build(tool):
    path = llama_tool(tool)
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    # llama.cpp's tools print their usage and exit 0 (rpc-server and a few others exit 1 after
    # printing it); a missing library would fail to load instead ("error while loading").
    assert "error while loading shared libraries" not in done.stderr
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert "usage" in (done.stdout + done.stderr).lower()


def test_backends_match_the_recorded_flags():
    build = provenance.llama_cpp_build()
    assert build["flags"], "the build records its CMake flags"
    assert bool(llama_cpp.llama_supports_rpc()) == build["rpc"]
    devices = provenance.llama_cpp_devices()
    assert [d["type"] for d in devices if d["type"] == "cpu"] == ["cpu"]
    if not build["cuda"]:
        assert not [d for d in devices if d["type"] in ("gpu", "igpu")]
        # why a GPU check must look at the devices: with RPC compiled in, llama.cpp reports
        # GPU offload support on a CPU-only build
        assert bool(llama_cpp.llama_supports_gpu_offload()) == build["rpc"]
    cuda = provenance.collect()["cuda"]
    assert cuda["llama_cpp_cuda"] == build["cuda"]
    if not provenance.gpus():  # this machine: no driver, so no versions to record
        assert cuda["driver"] is None and cuda["driver_cuda"] is None


def test_missing_tool_is_one_clear_error():
    with pytest.raises(PipelineError, match=r"llama-nonesuch not found .*make setup"):
        llama_tool("llama-nonesuch")
