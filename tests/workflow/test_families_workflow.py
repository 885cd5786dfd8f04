"""Every cluster model's shape through the whole workflow, in one `snakemake --cores 2` run.

Tiny random checkpoints (tests/families.py) of Llama 2, Mistral, Falcon 7B (multi-query) and Falcon
40B-shaped (grouped KV) as `dir` models on "shared storage", plus the falcon-rw-1b
shape that llama.cpp cannot run: no --keep-going, the GGUF models get their variants on both
backends, falcon-rw-1b the transformers backend only with its reason in the dry run and the
summary, and the fine-tuned Falcon 7B (saved by save_pretrained, num_kv_heads written out) converts.
"""

from __future__ import annotations

import csv
import json
import stat

import pytest
from families import make_checkpoint
from helpers import default_config, make_workdir, parse_job_stats, planned_jobs, snakemake

pytestmark = pytest.mark.workflow
# SmolLM2's own chain is the default run's (tests/conftest.py default_run), on the real model
GGUF_FAMILIES = ["llama-2", "mistral", "falcon-7b", "falcon-40b"]
NO_GGUF = "falcon-rw-1b"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """Read-only "shared storage" with one tiny checkpoint per family."""
    root = tmp_path_factory.mktemp("scratch")
    bpe = tmp_path_factory.mktemp("bpe")
    for family in [*GGUF_FAMILIES, NO_GGUF]:
        make_checkpoint(family, root / family, bpe)
    for path in root.rglob("*"):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return root


def families_config(storage) -> dict:
    config = default_config()
    config["models"] = {
        family: {"source": "dir", "path": str(storage / family)}
        for family in [*GGUF_FAMILIES, NO_GGUF]
    }
    config["quantize"]["types"] = ["Q4_K_M"]
    evaluate = config["evaluate"]
    evaluate["perplexity"] = {"n_ctx": 128, "chunks": 1}
    evaluate["sampling"]["max_new_tokens"] = 8
    evaluate["transformers"]["batch_size"] = 2
    evaluate["bandwidth_probe"] = {"size_mb": 64, "repetitions": 1}
    config["prompts"] = "config/two_prompts.txt"
    config["finetune"] = {
        "enabled_for": ["falcon-7b"],
        "defaults": {},
        "models": {
            "falcon-7b": {
                "max_steps": 2,
                "batch_size": 2,
                "seq_len": 64,
                "eval_every": 1,
                "eval_examples": 4,
                "save_every": 2,
                "task_train_examples": 8,
                "task_heldout_examples": 4,
                "gradient_checkpointing": False,
                "adapter_gguf": True,
            }
        },
    }
    return config


@pytest.fixture(scope="module")
def families_run(tmp_path_factory, storage):
    workdir = make_workdir(tmp_path_factory.mktemp("families"), families_config(storage))
    (workdir / "config" / "two_prompts.txt").write_text("The GNU licence\nFree software is\n")
    dry = snakemake(workdir, "-n")
    run = snakemake(workdir, "--cores", "2")
    return workdir, dry.stdout + dry.stderr, run


def test_dry_run_says_why_falcon_rw_1b_gets_no_gguf(families_run):
    _, dry, _ = families_run
    lines = [line for line in dry.splitlines() if line.startswith(f"{NO_GGUF}: GGUF steps")]
    assert len(lines) == 1, dry[-3000:]
    assert "ALiBi" in lines[0] and f"models.{NO_GGUF}.force_gguf: true" in lines[0]
    jobs = parse_job_stats(dry)
    # 5 GGUF models + falcon-7b-ft convert; falcon-rw-1b does not
    assert jobs["convert_to_gguf"] == len(GGUF_FAMILIES) + 1


def test_every_family_runs_its_whole_chain(families_run):
    workdir, _, _ = families_run
    for model in [*GGUF_FAMILIES, "falcon-7b-ft"]:
        for variant, backend in [
            ("F16", "llama.cpp"),
            ("Q4_K_M", "llama.cpp"),
            ("hf", "transformers"),
        ]:
            record = json.loads(
                (workdir / f"results/eval/{model}/{variant}-{backend}.json").read_text()
            )
            assert record["generated_tokens"] > 0, (model, variant, backend)
        q4 = json.loads((workdir / f"results/eval/{model}/Q4_K_M-llama.cpp.json").read_text())
        assert q4["kld_mean"] > 0 and q4["ppl_ratio"] > 0, model
    assert (workdir / "results/finetune/falcon-7b/adapter-F16.gguf").is_file()


def test_multi_query_falcon_was_converted_with_one_kv_head(families_run):
    workdir, _, _ = families_run
    from llmpipe.gguf import gguf_info

    base = json.loads((workdir / "results/gguf/falcon-7b/falcon-7b-F16.json").read_text())
    assert base["converter_config_fixes"] == {"num_kv_heads": [None, 1]}
    tuned = json.loads((workdir / "results/gguf/falcon-7b-ft/falcon-7b-ft-F16.json").read_text())
    # the merge's save_pretrained wrote AutoConfig's filled-in value: 8 heads, not 1
    assert tuned["converter_config_fixes"] == {"num_kv_heads": [8, 1]}
    grouped = json.loads((workdir / "results/gguf/falcon-40b/falcon-40b-F16.json").read_text())
    assert grouped["converter_config_fixes"] == {}
    assert (
        gguf_info(workdir / "results/gguf/falcon-7b-ft/falcon-7b-ft-F16.gguf")["architecture"]
        == "falcon"
    )


def test_falcon_rw_1b_keeps_its_transformers_steps_and_the_summary_says_why(families_run):
    workdir, _, _ = families_run
    assert not (workdir / "results/gguf" / NO_GGUF).exists()
    assert (
        json.loads((workdir / f"results/eval/{NO_GGUF}/hf-transformers.json").read_text())[
            "generated_tokens"
        ]
        > 0
    )
    with open(workdir / "results/stats/summary.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["model"] == NO_GGUF]
    assert [(r["variant"], r["backend"]) for r in rows] == [("hf", "transformers")]
    summary = (workdir / "results/stats/summary.md").read_text()
    section = summary.split(f"## {NO_GGUF}\n", 1)[1].split("\n## ", 1)[0]
    assert "GGUF (llama.cpp): not converted: Falcon with ALiBi positions" in section


def test_the_users_folders_were_not_touched(families_run, storage):
    workdir, _, _ = families_run
    for family in [*GGUF_FAMILIES, NO_GGUF]:
        assert (
            "num_kv_heads" not in json.loads((storage / family / "config.json").read_text())
            or family == "falcon-40b"
        )
        assert not any(p.name.startswith(".") for p in (storage / family).iterdir())
    staged = list((workdir / "shm").rglob("*.converter-*"))
    assert staged == []  # the converter's link folders are gone


def test_force_gguf_schedules_the_attempt(tmp_path, storage):
    config = families_config(storage)
    config["models"][NO_GGUF]["force_gguf"] = True
    forced = make_workdir(tmp_path / "forced", config)
    (forced / "config" / "two_prompts.txt").write_text("The GNU licence\n")
    jobs = planned_jobs(forced)
    assert jobs["convert_to_gguf"] == len(GGUF_FAMILIES) + 2
    dry = snakemake(forced, "-n")
    assert f"{NO_GGUF}: GGUF steps forced by models.{NO_GGUF}.force_gguf" in dry.stderr + dry.stdout
