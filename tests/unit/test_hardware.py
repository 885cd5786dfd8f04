"""Fail fast on the wrong hardware (llmpipe.hardware), on this GPU-less machine.

The driver is stood in for by a fake ``nvidia-smi`` on PATH where a test needs the check to get
past it; torch and llama.cpp are the real, installed builds (CPU torch; llama.cpp with the CPU
and RPC backends, which ``llama_supports_gpu_offload()`` alone reports as GPU-capable).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from llmpipe import hardware
from llmpipe.errors import ResourceError

FAKE_SMI = "#!/bin/sh\necho 'GPU 0: Tesla V100-PCIE-32GB (UUID: GPU-fake)'\n"


@pytest.fixture
def fake_driver(tmp_path, monkeypatch):
    """A node whose driver answers (nvidia-smi works) and which granted GPU 0."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv(hardware.FAKE_GRES_ENV, raising=False)
    return smi


@pytest.mark.parametrize(
    ("gres", "n"),
    [("", 0), (None, 0), ("gpu:v100d32q:2", 2), ("gpu:1", 1), ("gres:gpu:v100d32q:1", 1)],
)
def test_granted_gpus(gres, n):
    assert hardware.granted_gpus(gres) == n


def test_what_each_job_needs():
    cpu = hardware.need_for_eval("evaluate_shard", "", "llama.cpp", {"n_gpu_layers": 0})
    assert not cpu.any
    llama = hardware.need_for_eval("evaluate_shard", "gpu:v100d32q:1", "llama.cpp",
                                   {"n_gpu_layers": -1})  # fmt: skip
    assert llama.llama_cpp and not llama.torch and llama.granted == 1
    sweep = hardware.need_for_eval("evaluate_sweep", "", "llama.cpp", {"n_gpu_layers": [0, 99]})
    assert sweep.llama_cpp
    hf = hardware.need_for_eval("evaluate_shard", "", "transformers", {"device": "auto"})
    assert not hf.any  # auto on a CPU job: nothing to check
    granted = hardware.need_for_eval("evaluate_shard", "gpu:a:1", "transformers", {})
    assert granted.torch
    assert hardware.need_for_torch("finetune", "", wants_cuda=True).torch


def test_a_job_without_a_gpu_need_is_not_checked():
    assert hardware.check(hardware.Need("quantize"))["checked"] is False


def test_no_driver_names_rule_node_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(hardware.FAKE_GRES_ENV, raising=False)
    need = hardware.Need("evaluate_shard", torch=True, granted=1)
    with pytest.raises(ResourceError) as err:
        hardware.check(need)
    message = str(err.value)
    assert message.startswith(f"evaluate_shard on {__import__('socket').gethostname()}: needs")
    assert "nvidia-smi is not on PATH" in message and "--gres" in message
    assert "\n" not in message


def test_an_empty_cuda_visible_devices_is_no_gpu(fake_driver, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ResourceError, match="CUDA_VISIBLE_DEVICES is empty"):
        hardware.check(hardware.Need("finetune", torch=True, granted=1))


def test_a_failing_nvidia_smi_is_no_gpu(fake_driver):
    fake_driver.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    with pytest.raises(ResourceError, match=r"nvidia-smi failed \(exit 9: NVIDIA-SMI has failed"):
        hardware.check(hardware.Need("finetune", torch=True, granted=1))


def test_llama_cpp_gpu_check_uses_the_device_list_not_supports_gpu_offload(fake_driver):
    """Our build has the RPC backend: llama_supports_gpu_offload() says True, but its ggml
    devices are the CPU only, so a job that offloads layers is refused."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llmpipe import provenance

    if provenance.llama_cpp_build()["cuda"]:
        pytest.skip("this llama.cpp is a CUDA build")
    assert llama_cpp.llama_supports_gpu_offload()  # the misleading answer
    assert hardware.llama_gpu_devices() == []
    need = hardware.need_for_eval("evaluate_shard", "gpu:v100d32q:1", "llama.cpp",
                                  {"n_gpu_layers": -1})  # fmt: skip
    with pytest.raises(ResourceError, match="no GPU backend.*LLMPIPE_CUDA=1"):
        hardware.check(need)


def test_the_test_only_switch_skips_the_check_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(hardware.FAKE_GRES_ENV, "1")
    facts = hardware.check(hardware.Need("evaluate_reference", llama_cpp=True, granted=1))
    assert facts["checked"] is False and hardware.FAKE_GRES_ENV in facts["reason"]


def test_a_script_stops_before_any_work_with_one_line(fake_driver, tmp_path):
    """Through llmpipe.script.logged, as the workflow's scripts call it: exit 1, one line on
    the terminal, nothing done."""
    log = tmp_path / "job.log"
    marker = tmp_path / "work-done"
    code = textwrap.dedent(f"""
        from llmpipe.hardware import need_for_torch
        from llmpipe.script import logged
        gpu = need_for_torch("finetune", "gpu:v100d32q:1", wants_cuda=True)
        with logged({str(log)!r}, "finetune", gpu=gpu):
            open({str(marker)!r}, "w").write("x")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and not marker.exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune: error: finetune on ")
    assert "CPU-only build" in lines[0] or "sees no GPU" in lines[0]
    assert lines[0] in log.read_text()
