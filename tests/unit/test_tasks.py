"""Task accuracy (evaluate.tasks): shipped task files, task configs, lm-eval's results flattened
into our record, the report's tables, config checks, planning and the llama-server manager's
failure path (a real llama-server on a file that is no GGUF: no model needed)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, default_config

from llmpipe import config as cfg
from llmpipe.errors import ConfigError, PipelineError
from llmpipe.evaluation import task_files, tasks
from llmpipe.evaluation.server import LlamaServer, port_is_free
from llmpipe.finetune import tasks as ft_tasks
from llmpipe.planning import RunPlan
from llmpipe.report import accuracy

TASK_DIR = REPO / "config" / "eval" / "tasks"

# The shape of lm-eval 0.4.13's simple_evaluate() results (the parts flatten reads).
LM_EVAL_RESULTS = {
    "results": {
        "gpl_cloze": {
            "alias": "gpl_cloze",
            "acc,none": 0.5,
            "acc_stderr,none": 0.1,
            "acc_norm,none": 0.45,
            "acc_norm_stderr,none": "N/A",
        },
        "reverse_words": {"alias": "reverse_words", "exact_match,none": 0.25},
    },
    "versions": {"gpl_cloze": 1.0, "reverse_words": 1.0},
    "n-samples": {
        "gpl_cloze": {"original": 62, "effective": 20},
        "reverse_words": {"original": 100, "effective": 20},
    },
}


def test_shipped_task_files_are_what_their_sources_give():
    assert task_files.main(["--check"]) == 0


def test_reverse_words_is_the_default_held_out_split_never_trained_on():
    train, heldout = ft_tasks.generate("reverse_words", 1000, 100, 0)
    shipped = [json.loads(line) for line in (TASK_DIR / "reverse_words.jsonl").open()]
    assert [d["instruction"] for d in shipped] == [r["instruction"] for r in heldout]
    assert not {d["instruction"] for d in shipped} & {r["instruction"] for r in train}


def test_gpl_cloze_answers_are_the_sentences_last_words():
    text = " ".join((REPO / "config" / "eval" / "gpl-3.0.txt").read_text().split())
    docs = [json.loads(line) for line in (TASK_DIR / "gpl_cloze.jsonl").open()]
    assert len(docs) >= 50
    for doc in docs:
        answer = doc["choices"][doc["label"]]
        assert len(set(doc["choices"])) == 4
        assert f"{doc['context']} {answer}" in text


def test_load_task_makes_data_files_absolute_and_leaves_registry_names(tmp_path):
    task = tasks.load_task("gpl_cloze", TASK_DIR)
    data = task["dataset_kwargs"]["data_files"]["test"]
    assert os.path.isabs(data) and data == str(TASK_DIR / "gpl_cloze.jsonl")
    assert tasks.output_type(task) == "multiple_choice"
    assert not tasks.uses_chat_template(task, default=True)
    assert tasks.uses_chat_template(tasks.load_task("reverse_words", TASK_DIR), default=False)
    assert tasks.load_task("hellaswag", TASK_DIR) == "hellaswag"


def test_a_task_yaml_naming_a_missing_data_file_is_one_error(tmp_path):
    (tmp_path / "t.yaml").write_text(
        "task: t\ndataset_kwargs:\n  data_files:\n    test: no.jsonl\n"
    )
    with pytest.raises(ConfigError, match=r"t.yaml: data_files.test: .*no.jsonl does not exist"):
        tasks.load_task("t", tmp_path)
    (tmp_path / "u.yaml").write_text("task: other\n")
    with pytest.raises(ConfigError, match="u.yaml: expected an lm-eval task YAML with 'task: u'"):
        tasks.load_task("u", tmp_path)


def test_flatten_gives_one_row_per_task_and_metric_with_stderr_n_and_version():
    rows = tasks.flatten(LM_EVAL_RESULTS)
    assert rows == [
        {"task": "gpl_cloze", "metric": "acc", "filter": "none", "value": 0.5, "stderr": 0.1,
         "n": 20, "version": 1.0},
        {"task": "gpl_cloze", "metric": "acc_norm", "filter": "none", "value": 0.45,
         "stderr": None, "n": 20, "version": 1.0},
        {"task": "reverse_words", "metric": "exact_match", "filter": "none", "value": 0.25,
         "stderr": None, "n": 20, "version": 1.0},
    ]  # fmt: skip


def test_perplexity_tasks_are_refused_for_gguf_with_the_reason():
    assert "loglikelihood_rolling" in tasks.REFUSED["llama.cpp"]
    assert "evaluate_quality" in tasks.REFUSED["llama.cpp"]["loglikelihood_rolling"]
    assert not tasks.REFUSED["transformers"]


def _record(path, model, variant, backend, value, stderr):
    rows = [
        {"task": "gpl_cloze", "metric": "acc", "value": value, "stderr": stderr, "n": 20},
        {"task": "gpl_cloze", "metric": "acc_norm", "value": 0.0, "stderr": 0.0, "n": 20},
    ]
    record = {"model": model, "variant": variant, "backend": backend, "results": rows}
    path.write_text(json.dumps(record))
    return path


def test_report_tables_take_each_tasks_first_metric_and_the_size(tmp_path):
    paths = [
        _record(tmp_path / "a.json", "m", "hf", "transformers", 0.5, 0.1),
        _record(tmp_path / "b.json", "m-ft", "hf", "transformers", 0.75, 0.1),
    ]
    summary = pd.DataFrame(
        {"model": ["m", "m-ft"], "variant": ["hf"] * 2, "backend": ["transformers"] * 2,
         "size_bytes": [2**20, 2**20]}
    )  # fmt: skip
    frame = accuracy.task_frame(paths, summary)
    assert list(frame["metric"]) == ["acc", "acc"]
    assert list(frame["size_bytes"]) == [2**20, 2**20]
    table = accuracy.accuracy_table(frame[frame["model"] == "m"])
    assert "gpl_cloze (acc, n=20)" in table and "0.500 ± 0.100" in table
    versus = accuracy.base_vs_tuned_table(frame, "m", "m-ft")
    assert "+0.250" in versus
    png = accuracy.plot_accuracy_vs_size(frame, tmp_path / "acc.png")
    assert Path(png).read_bytes().startswith(b"\x89PNG")


def _tasks_config(**tasks_settings):
    config = default_config()
    config["evaluate"]["tasks"].update(enabled=True, **tasks_settings)
    return cfg.validate(config)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"variants": ["Q5_K_M"]}, r"evaluate.tasks.variants: Q5_K_M not a variant of this run"),
        ({"task_dir": "config/none"}, r"evaluate.tasks.task_dir: folder .*config/none does not"),
    ],
)
def test_cross_key_checks_of_tasks_name_the_key(settings, expected):
    with pytest.raises(ConfigError, match=expected):
        cfg.check(_tasks_config(**settings), workdir=REPO)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [({"limit": 0}, "limit"), ({"batchsize": 4}, "batchsize"), ({"names": []}, "names")],
)
def test_schema_rejects_bad_task_settings_with_the_key_named(settings, expected):
    config = default_config()
    config["evaluate"]["tasks"].update(settings)
    with pytest.raises(ConfigError, match=expected):
        cfg.validate(copy.deepcopy(config))


def test_tasks_are_off_by_default_and_plan_one_job_per_model_variant_backend():
    assert RunPlan(cfg.validate(default_config()), root=REPO).task_jsons() == []
    plan = RunPlan(_tasks_config(variants=["hf", "F16"]), root=REPO)
    assert plan.task_jsons() == [
        ("smollm2", "F16", "llama.cpp"),
        ("smollm2", "hf", "transformers"),
        ("smollm2-ft", "F16", "llama.cpp"),
        ("smollm2-ft", "hf", "transformers"),
    ]
    assert "results/eval/smollm2-ft/tasks/hf-transformers.json" in plan.final_outputs()
    assert plan.task_files() == [
        "config/eval/tasks/reverse_words.yaml",
        "config/eval/tasks/reverse_words.jsonl",
        "config/eval/tasks/gpl_cloze.yaml",
        "config/eval/tasks/gpl_cloze.jsonl",
    ]
    step, options = plan.tasks_estimate("llama.cpp", "F16")
    assert step == "evaluate_llama_cpp" and options["n_ctx"] == 2048 * 4


def test_a_server_that_cannot_load_its_model_is_an_error_and_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    server = LlamaServer(
        bad, slots=1, n_ctx=128, threads=1, n_gpu_layers=0, log=tmp_path / "server.log"
    )
    with (
        pytest.raises(PipelineError, match=r"llama-server exited with status .*/server.log"),
        server,
    ):
        pass
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert port_is_free(server.port)
    assert (tmp_path / "server.log").stat().st_size > 0
