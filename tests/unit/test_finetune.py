"""Fine-tuning library: settings, launch command, data and the chat template.

The real training runs are in tests/workflow/test_finetune_training.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, make_finetune_inputs

from llmpipe.errors import ConfigError, ResourceError, SourceError
from llmpipe.finetune import dataset as ds
from llmpipe.finetune import launch, tasks
from llmpipe.finetune import settings as ft


def schema() -> dict:
    return yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


# --------------------------------------------------------------------------------------------
# Settings and the model table
# --------------------------------------------------------------------------------------------


def test_settings_are_a_view_of_the_schemas_keys_and_defaults():
    sec = schema()["properties"]["finetune"]["properties"]
    props = sec["defaults"]["properties"]
    assert list(ft.Settings.__dataclass_fields__) == list(props)
    assert ft.Settings().as_dict() == {k: v["default"] for k, v in props.items()}
    overrides = sec["models"]["additionalProperties"]["properties"]
    assert set(overrides) == set(props)
    assert all(v["$ref"].endswith(f"/{k}") for k, v in overrides.items())
    # every key is used by some step
    assert all(f.metadata["groups"] for f in dataclasses.fields(ft.Settings))


def test_config_file_validates_and_resolves_per_model_overrides(tmp_path):
    from llmpipe import config as cfg

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["finetune"]["defaults"] = {"lora_r": 4}
    cfg.validate(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    ft.check(config)
    assert ft.tuned_models(config) == ["smollm2-ft"]
    s = ft.resolve(config, "smollm2")
    assert s.lora_r == 4  # from finetune.defaults
    assert s.max_steps == config["finetune"]["models"]["smollm2"]["max_steps"]  # per model
    assert s.lora_alpha == 32  # schema default
    assert "learning_rate" in s.group(ft.TRAIN) and "learning_rate" not in s.group(ft.COMPARE)
    # The per-model overrides are typed by the schema, without defaults being filled in.
    config["finetune"]["models"]["smollm2"]["lora_r"] = "big"
    with pytest.raises(ConfigError, match="lora_r"):
        cfg.validate(config, REPO / "workflow" / "schemas" / "config.schema.yaml")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"enabled_for": ["nope"]}, "finetune.enabled_for: 'nope' is not a model id"),
        ({"enabled_for": ["smollm2"], "models": {"other": {}}}, "other: .* does not list"),
        (
            {"enabled_for": ["smollm2"], "defaults": {"method": "qlora", "device": "cpu"}},
            "finetune.defaults.method: qlora needs a CUDA GPU",
        ),
        (
            {
                "enabled_for": ["smollm2"],
                "models": {"smollm2": {"strategy": "fsdp", "method": "qlora"}},
            },
            "finetune.models.smollm2.strategy: fsdp with method qlora",
        ),
        (
            {"enabled_for": ["smollm2"], "defaults": {"device": "cpu", "precision": "bf16"}},
            "finetune.defaults.precision: bf16 mixed precision needs a GPU",
        ),
        (
            {"enabled_for": ["smollm2"], "defaults": {"heldout_file": "h.jsonl"}},
            "finetune.defaults.heldout_file: set, but train_file is null",
        ),
        ({"defaults": {"learnin_rate": 1}}, "finetune.defaults.learnin_rate: unknown key"),
        (
            {"defaults": {"batch_size": 0}},
            "finetune.defaults.batch_size: 0 is less than the minimum",
        ),
        (
            {"models": {"smollm2": {"method": "lor"}}},
            "finetune.models.smollm2.method: 'lor' is not",
        ),
    ],
)
def test_bad_finetune_sections_name_the_key(section, message):
    """The schema checks each key (validate), ft.check what spans several."""
    from llmpipe import config as cfg

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["finetune"] = section
    with pytest.raises(ConfigError, match=message):
        cfg.validate(config)
        ft.check(config)


def test_tuned_id_may_not_collide_with_a_model():
    config = {"models": {"a": {}, "a-ft": {}}, "finetune": {"enabled_for": ["a"]}}
    with pytest.raises(ConfigError, match="already defines"):
        ft.check(config)


def test_default_targets_per_architecture():
    fixtures = REPO / "tests" / "fixtures" / "model_configs"
    s = ft.Settings()
    for name, expected in [
        ("llama-2-7b.json", ft.LLAMA_TARGETS),
        ("mistral-7b-v0.1.json", ft.LLAMA_TARGETS),
        ("falcon-7b.json", ft.FALCON_TARGETS),
        ("smollm2-135m.json", ft.LLAMA_TARGETS),
    ]:
        model_type = json.loads((fixtures / name).read_text())["model_type"]
        assert ft.target_modules(s, model_type) == list(expected), name
    assert ft.target_modules(s, "gpt_neox") == "all-linear"
    assert ft.target_modules(ft.Settings(target_modules=["q_proj"]), "llama") == ["q_proj"]


def test_estimate_options_feed_the_estimator():
    from llmpipe import resources

    opts = ft.estimate_options(ft.Settings(max_steps=None, epochs=2, batch_size=4), 100)
    assert opts["steps"] == 2 * 7 and opts["hw"] == "cpu" and opts["dtype"] == "f32"
    gpu = ft.estimate_options(ft.Settings(device="cuda"), 100)
    assert gpu["hw"] == "gpu" and gpu["dtype"] == "f16"
    config_json = REPO / "tests" / "fixtures" / "model_configs" / "llama-2-13b.json"
    plan = resources.plan("finetune", config_json, **gpu)
    assert plan.gpus >= 1 and plan.mem_mb > 1000


def test_compare_plans_as_a_transformers_evaluation_of_the_heldout_set(tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    rows = [{"instruction": "x" * 90, "response": "y" * 30}, {"instruction": "z", "response": "w"}]
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ft.compare_estimate_options(ft.Settings(compare_batch_size=16), str(heldout))
    # batch: the 2 examples; prompt 90 B -> 30 tokens + 64 for the template + answer 11
    assert opts == {
        "hw": "cpu", "dtype": "f32", "batch": 2, "seq_len": 30 + 64 + 11, "new_tokens": 19,
        "samples": 4, "full_logits": True, "scored_tokens": 11,
    }  # fmt: skip
    gpu = ft.compare_estimate_options(ft.Settings(device="cuda"), str(tmp_path / "missing"))
    assert gpu["hw"] == "gpu" and gpu["dtype"] == "f16" and gpu["batch"] == 16


def test_flops_lora_vs_full():
    from llmpipe.estimate import ModelShape
    from llmpipe.finetune import flops

    shape = ModelShape.from_config(
        REPO / "tests" / "fixtures" / "model_configs" / "smollm2-135m.json"
    )
    c = flops.FlopCounts.of(shape, lora_params=shape.lora_params(16))
    assert c.body == shape.linear_params and c.head == shape.vocab * shape.hidden
    full = flops.full_flops(c, tokens=1000, seq_len=0)
    # The 6N rule (N: every weight that multiplies; a tied head once; norms are not matmuls).
    assert full == pytest.approx(6 * shape.matmul_params * 1000, rel=1e-3)
    every = flops.lora_flops(c, tokens=1000, scored=1000, seq_len=0, gradient_checkpointing=False)
    assert every == 1000 * (4 * c.body + 6 * c.lora + 4 * c.head)
    assert 0.69 < every / full < 0.72  # SmolLM2, r=16 on all 7 projections
    masked = flops.lora_flops(c, tokens=1000, scored=200, seq_len=0, gradient_checkpointing=False)
    gc = flops.lora_flops(c, tokens=1000, scored=200, seq_len=0, gradient_checkpointing=True)
    assert masked < every and gc - masked == 1000 * 2 * (c.body + c.lora)


# --------------------------------------------------------------------------------------------
# Launch command
# --------------------------------------------------------------------------------------------


def test_launch_single_process_needs_no_launcher():
    cmd = launch.launch_command(["--spec", "s.json"], nodes=1, gpus_per_node=1, allocation=None)
    assert cmd == [sys.executable, "-m", "llmpipe.finetune.train", "--spec", "s.json"]


def test_launch_one_node_several_gpus_is_standalone_torchrun():
    alloc = launch.SlurmAllocation("7", ("gpu01",))
    for allocation in (None, alloc):  # inside Slurm, one node needs no srun either
        cmd = launch.launch_command(
            ["--spec", "s"], nodes=1, gpus_per_node=4, allocation=allocation
        )
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert "--standalone" in cmd and cmd[cmd.index("--nproc_per_node") + 1] == "4"
        assert cmd[-4:] == ["-m", "llmpipe.finetune.train", "--spec", "s"]


def test_launch_several_nodes_uses_srun_and_c10d_on_the_first_node():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "onode[10-13]",
        "SLURM_CPUS_PER_TASK": "8",
    }
    alloc = launch.slurm_allocation(env)
    assert alloc.nodes == ("onode10", "onode11", "onode12", "onode13")
    cmd = launch.launch_command(
        ["--spec", "s"], nodes=4, gpus_per_node=1, allocation=alloc, rdzv_port=4444
    )
    srun = cmd[: cmd.index(sys.executable)]
    assert srun[:7] == ["srun", "--nodes", "4", "--ntasks", "4", "--ntasks-per-node", "1"]
    assert "--cpus-per-task" in srun and srun[srun.index("--cpus-per-task") + 1] == "8"
    rest = cmd[len(srun) :]
    assert rest[rest.index("--rdzv_endpoint") + 1] == "onode10:4444"
    assert rest[rest.index("--rdzv_backend") + 1] == "c10d"
    assert rest[rest.index("--nnodes") + 1] == "4"
    assert rest[rest.index("--rdzv_id") + 1] == "llmpipe-4242"
    assert "--node-rank" not in rest and "--master-addr" not in rest  # c10d assigns ranks


def test_launch_refuses_what_cannot_start():
    with pytest.raises(ConfigError, match="Slurm allocation"):
        launch.launch_command([], nodes=2, gpus_per_node=1, allocation=None)
    small = launch.SlurmAllocation("1", ("n1",))
    with pytest.raises(ResourceError, match="request nodes=2"):
        launch.launch_command([], nodes=2, gpus_per_node=1, allocation=small)
    assert launch.slurm_allocation({}) is None


@pytest.mark.parametrize(
    ("hostlist", "expected"),
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("a[1,3-4],b7", ["a1", "a3", "a4", "b7"]),
        ("n[008-010]-ib", ["n008-ib", "n009-ib", "n010-ib"]),
    ],
)
def test_expand_hostlist(hostlist, expected):
    assert launch.expand_hostlist(hostlist) == expected


def test_launch_env_shares_the_threads_between_processes():
    env = launch.launch_env(8, 2, env={})
    assert env["OMP_NUM_THREADS"] == "4"
    assert str(REPO / "src") in env["PYTHONPATH"].split(os.pathsep)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_default_task_is_seeded_and_splits_are_disjoint():
    train, heldout = tasks.generate("reverse_words", 200, 50, seed=3)
    assert (train, heldout) == tasks.generate("reverse_words", 200, 50, seed=3)
    assert train != tasks.generate("reverse_words", 200, 50, seed=4)[0]
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in heldout}
    for r in train + heldout:
        words = r["instruction"].split(": ", 1)[1].split(", ")
        assert 3 <= len(words) <= 5 and r["response"] == ", ".join(reversed(words))


def test_prepare_user_files_and_split(tmp_path):
    records = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(20)]
    ds.write_jsonl(tmp_path / "mine.jsonl", records)
    settings = {**ft.Settings().group(ft.DATA), "train_file": str(tmp_path / "mine.jsonl")}
    summary = ds.prepare(settings, tmp_path / "train.jsonl", tmp_path / "heldout.jsonl")
    assert summary["train_examples"] == 18 and summary["heldout_examples"] == 2
    again = ds.prepare(settings, tmp_path / "t2.jsonl", tmp_path / "h2.jsonl")
    assert again == summary
    assert (tmp_path / "heldout.jsonl").read_text() == (tmp_path / "h2.jsonl").read_text()


def test_bad_data_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "response": "a"}\n{"instruction": "q"}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2: 'response' missing"):
        ds.read_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(SourceError, match=r"bad.jsonl:1: not valid JSON"):
        ds.read_jsonl(bad)


# --------------------------------------------------------------------------------------------
# A tiny real model (tests/helpers.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_finetune_inputs(tmp_path_factory.mktemp("tiny"))


def test_chat_template_rendering_masks_the_prompt(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["hf"])
    record = {"instruction": "Reverse the order of these words: a, b, c", "response": "c, b, a"}
    prompt, full = ds.render(tok, record)
    assert prompt.endswith("<|im_start|>assistant\n") and "You are a helpful" in prompt
    assert full == prompt + "c, b, a<|im_end|>\n"
    example = ds.tokenize(tok, record, seq_len=200)
    n_prompt = len(ds.prompt_ids(tok, record))
    assert example.labels[:n_prompt] == [ds.IGNORE] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert tok.decode(example.input_ids[n_prompt:]) == "c, b, a<|im_end|>\n"
    assert ds.tokenize(tok, record, seq_len=n_prompt) is None  # nothing left to learn


def test_fallback_template_for_a_tokenizer_without_one(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["hf"])
    tok.chat_template = None
    assert ds.ensure_chat_template(tok) is False
    prompt, full = ds.render(tok, {"instruction": "hi", "response": "yo"})
    assert prompt.endswith("### Instruction:\nhi\n\n### Response:\n")
    assert full == prompt + "yo<|im_end|>"


def test_qlora_without_cuda_fails_fast(tmp_path):
    """Asked for on a machine without CUDA, QLoRA stops before loading anything."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from llmpipe.finetune.runner import fail_fast

    with pytest.raises(ResourceError, match="qlora needs a CUDA GPU"):
        fail_fast({"method": "qlora"})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"settings": {"method": "qlora"}}))
    done = subprocess.run(
        [sys.executable, "-m", "llmpipe.finetune.train", "--spec", str(spec)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "qlora needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
