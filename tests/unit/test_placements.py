"""evaluate.placements: what the planner runs, plans out (with why) and asks for, before any
job starts; the placement record's section of the summary."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from helpers import REPO

from llmpipe import config as cfg
from llmpipe import planning
from llmpipe.errors import ConfigError
from llmpipe.evaluation import placements as pl
from llmpipe.report import placements as report_placements

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def config() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["prompts"] = str(REPO / config["prompts"])
    config["evaluate"]["text"] = str(REPO / config["evaluate"]["text"])
    return config


def plan(config: dict, tmp_path) -> planning.RunPlan:
    config = copy.deepcopy(config)
    cfg.validate(config, SCHEMA)
    return planning.RunPlan(config, root=tmp_path)


def test_gpu_placements_are_planned_out_on_a_build_without_a_gpu_backend(config, tmp_path):
    p = plan(config, tmp_path)
    assert not pl.gpu_build()  # this machine's CPU + RPC build
    run = [x.name for x in p.placements_run()]
    assert run == ["cpu-1-thread", "cpu", "2-hosts"]
    notes = p.placement_notes()
    assert set(notes) == {"1-gpu", "2-gpus-layer"}
    assert all("no GPU backend" in why and "LLMPIPE_CUDA=1" in why for why in notes.values())
    # the base model only (a tuned model has its base's shape), on the reference GGUF
    assert p.placement_outputs() == [f"results/eval/smollm2/placements/{name}.json" for name in run]
    assert "results/eval/smollm2/placements/2-hosts.json" in p.eval_outputs()


def test_why_not_names_what_is_missing():
    gpu = pl.Placement("g", gpus=2)
    hosts = pl.Placement("h", hosts=3)
    assert pl.why_not(gpu, gpus_available=True, rpc_available=True) is None
    assert "2 GPU(s)" in pl.why_not(gpu, gpus_available=False, rpc_available=True)
    assert "RPC" in pl.why_not(hosts, gpus_available=True, rpc_available=False)
    assert (
        pl.why_not(pl.Placement("c", threads=1), gpus_available=False, rpc_available=False) is None
    )


def test_placements_off_or_without_llama_cpp_plan_nothing(config, tmp_path):
    config["evaluate"]["placements"]["enabled"] = False
    assert plan(config, tmp_path).placement_outputs() == []
    config["evaluate"]["placements"]["enabled"] = True
    config["evaluate"]["backends"] = ["transformers"]
    assert plan(config, tmp_path).placement_outputs() == []


def test_bad_placements_are_one_clear_error(config, tmp_path):
    bad = copy.deepcopy(config)
    bad["evaluate"]["placements"]["list"] = [{"name": "a"}, {"name": "a", "threads": 1}]
    with pytest.raises(ConfigError, match="'a' appears twice"):
        plan(bad, tmp_path).placement_outputs()
    bad["evaluate"]["placements"]["list"] = [{"name": "../x"}]
    with pytest.raises(ConfigError, match="name"):
        plan(bad, tmp_path)
    bad["evaluate"]["placements"]["list"] = [{"name": "x", "hosts": 0}]
    with pytest.raises(ConfigError, match="hosts"):
        plan(bad, tmp_path)
    bad = copy.deepcopy(config)
    bad["evaluate"]["placements"]["variant"] = "Q2_K"
    with pytest.raises(ConfigError, match="evaluate.placements.variant"):
        plan(bad, tmp_path).placement_outputs()


def test_a_placement_job_plans_as_a_llama_cpp_benchmark(config, tmp_path):
    p = plan(config, tmp_path)
    step, options = p.placement_estimate("2-hosts")
    assert step == "evaluate_llama_cpp"
    assert options["hw"] == "cpu" and options["quant"] == p.reference
    assert options["seq_len"] == 128 and options["new_tokens"] == 32 and options["samples"] == 3


def test_placement_describe():
    assert pl.Placement("a", gpus=2, split_mode="row").describe() == "1 host x 2 GPUs, row split"
    assert pl.Placement("b", hosts=2).describe() == "2 hosts x CPU"
    assert pl.Placement("c", threads=1).describe() == "1 host x CPU, 1 thread"


def test_summary_section_lists_what_ran_and_what_did_not(tmp_path):
    record = {
        "model": "m", "variant": "F16", "placement": {"name": "2-hosts"},
        "description": "2 hosts x CPU", "where": "local", "threads": 2, "pp_tok_s": 50.0,
        "pp_sd": 1.0, "tg_tok_s": 10.0, "tg_sd": 0.5, "load_s": 1.5, "gb_moved": 0.27,
        "load_gb_per_s": 0.18,
    }  # fmt: skip
    path = tmp_path / "2-hosts.json"
    path.write_text(json.dumps(record))
    table = report_placements.frame([path])
    lines = "\n".join(report_placements.section(table, {"1-gpu": "needs 1 GPU(s) per host"}))
    assert "| m | F16 | 2-hosts (2 hosts x CPU) | local | 50.0 ± 1.0 | 10.0 ± 0.5 |" in lines
    assert "- `1-gpu`: needs 1 GPU(s) per host" in lines
    assert report_placements.section(table.iloc[0:0], {}) == []
    assert report_placements.plot(table, tmp_path / "p.png") == str(tmp_path / "p.png")


def test_the_build_is_read_from_its_recorded_flags_and_the_library_agrees(monkeypatch):
    from llmpipe import paths

    recorded = (pl.gpu_build(), pl.rpc_build())
    monkeypatch.setattr(paths, "llama_build_flags", lambda: None)  # no FLAGS: ask the library
    assert (pl.gpu_build(), pl.rpc_build()) == recorded
    cuda = "-DGGML_NATIVE=OFF -DGGML_RPC=ON -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=70"
    monkeypatch.setattr(paths, "llama_build_flags", lambda: cuda)
    assert pl.gpu_build() and pl.rpc_build()
    monkeypatch.setattr(paths, "llama_build_flags", lambda: "-DGGML_NATIVE=OFF")
    assert not pl.gpu_build() and not pl.rpc_build()
