"""The hardware table (config ``hardware``): the GPU types jobs are planned for, which is also the
roofline of GPU evaluation runs; the factories every step builds its estimate with; and the
constants module that planning and running code share without importing each other."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

from llmpipe import config as cfg
from llmpipe import resources as res
from llmpipe.errors import ConfigError
from llmpipe.estimate import DEFAULTS, MIB, V100
from llmpipe.estimate.hardware import bandwidth_table, gpu, planned_cpu, planned_gpu
from llmpipe.estimate.types import host_estimate
from llmpipe.evaluation.bandwidth import table_bandwidth

ROOT = REPO
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
FIXTURES = REPO / "tests" / "fixtures" / "model_configs"


def default_config() -> dict:
    return cfg.validate(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), SCHEMA)


@pytest.fixture
def planner(monkeypatch):
    """llmpipe.resources with its own hardware and plan cache, restored afterwards."""
    monkeypatch.setattr(res, "_HARDWARE", {})
    monkeypatch.setattr(res, "_PLANS", {})
    return res


def test_the_library_default_gpu_is_the_configs_default():
    schema = yaml.safe_load(SCHEMA.read_text())
    defaults = schema["properties"]["hardware"]["properties"]["gpus"]["default"]
    assert gpu("v100d32q", defaults["v100d32q"]) == V100
    listed = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["hardware"]["gpus"]
    assert listed == defaults  # config.yaml lists the schema's table
    hardware = default_config()["hardware"]
    assert planned_gpu(hardware, default_config()["slurm"]["gpu_type"]) == V100
    assert V100.mem_mb == 32768 and V100.mem_bw == 900e9 and not V100.native_bf16
    cpu = planned_cpu(hardware, cores=2)
    assert cpu.flops_f32 == 100e9 and cpu.mem_bw == 20e9 and cpu.mem_mb == 8192


def test_the_roofline_reads_the_same_table_by_the_longest_match():
    table = bandwidth_table(default_config()["hardware"])
    assert table_bandwidth("GRID V100D-32Q", table) == 900
    assert table_bandwidth("Tesla V100-SXM2-32GB", table) == 900
    assert table_bandwidth("NVIDIA A100-SXM4-80GB", table) == 2039
    assert table_bandwidth("NVIDIA A100-PCIE-40GB", table) == 1555
    assert table_bandwidth("NVIDIA H200", table) == 4800
    assert table_bandwidth("Radeon Pro", table) is None
    # Without ``match`` the key is the name part.
    assert bandwidth_table({"gpus": {"X9": {"bandwidth_gb_s": 1}}}) == {"X9": 1.0}


def test_planning_follows_the_configured_gpu_type(planner):
    hardware = default_config()["hardware"]
    llama13b = FIXTURES / "llama-2-13b.json"
    assert planner.plan("evaluate_transformers", llama13b, hw="gpu").gpus == 2  # 2 x 32 GiB
    planner.use_hardware(hardware, "h200")
    plan = planner.plan("evaluate_transformers", llama13b, hw="gpu")
    assert plan.gpus == 1 and plan.on_gpu  # 141 GiB
    # An estimator that takes ``hw`` gets the configured GPU when none is named.
    assert planner.plan("finetune", llama13b, method="lora").gpus == 1
    assert planner.plan("evaluate_transformers", llama13b, hw="cpu").gpus == 0
    with pytest.raises(ConfigError, match="slurm.gpu_type: 'b200' has no entry in hardware.gpus"):
        planner.use_hardware(hardware, "b200")
    with pytest.raises(ConfigError, match="expected 'cpu' or 'gpu'"):
        planner.plan("evaluate_transformers", llama13b, hw="v100")


def test_an_incomplete_gpu_entry_names_its_key():
    with pytest.raises(ConfigError, match="hardware.gpus.x1: missing key 'bandwidth_gb_s'"):
        gpu("x1", {"memory_gb": 16, "tflops_f16": 1, "tflops_f32": 1})
    config = default_config()
    broken = copy.deepcopy(config)
    broken["hardware"]["gpus"]["x1"] = {"memory_gb": 16}
    with pytest.raises(ConfigError, match=r"hardware\.gpus\.x1"):
        cfg.validate(broken, SCHEMA)


def test_host_estimate_requests_the_peak_and_runtime_with_margins():
    e = host_estimate("step", DEFAULTS, peak=100 * MIB, seconds=600, disk=3 * MIB, notes=["n"])
    assert (e.mem_mb, e.runtime_min, e.disk_mb, e.gpus, e.fits) == (125, 15, 3, 0, True)
    assert e.detail == {"runtime_s": 600, "host_peak_bytes": 100 * MIB} and e.notes == ("n",)
    assert host_estimate("step", DEFAULTS, peak=0, seconds=1).runtime_min == 5  # the floor


def test_planning_imports_no_running_code():
    code = (
        "import sys, {module}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('llmpipe', 'torch', 'transformers', 'numpy', 'yaml'))))"
    )

    def loaded(module: str) -> list[str]:
        run = subprocess.run(
            [sys.executable, "-c", "import json; " + code.format(module=module)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(run.stdout)

    assert loaded("llmpipe.constants") == ["llmpipe", "llmpipe.constants"]
    modules = loaded("llmpipe.estimate")
    assert all(m == "llmpipe" or m.split(".")[1] in ("constants", "errors", "estimate")
               for m in modules), modules  # fmt: skip
