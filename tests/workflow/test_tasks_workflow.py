"""Task accuracy (evaluate.tasks) in the real workflow, on a copy of the default run: the shipped
tasks for the HF folder (lm-eval's hf model), the F16 and Q4_K_M GGUFs (llama-server and our
adapter), base and tuned; only the task jobs and the summary run; the server is gone after a
job, also after a failed one and after SIGTERM."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import copy_run, planned_jobs, snakemake

from llmpipe.evaluation.server import port_is_free

pytestmark = pytest.mark.workflow
LIMIT = 20  # documents per task: enough to separate base from tuned; a minute or two per job
VARIANTS = ["hf", "F16", "Q4_K_M"]
SERVER_LINE = re.compile(r"llama-server pid (\d+) on http://127\.0\.0\.1:(\d+)")


def enable_tasks(workdir: Path, **settings) -> None:
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["evaluate"]["tasks"] = {"enabled": True, "limit": LIMIT, "variants": VARIANTS}
    config["evaluate"]["tasks"].update(settings)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def tasks_run(default_run, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """A copy of the default run with evaluate.tasks enabled and run; the jobs it planned."""
    workdir = copy_run(default_run, tmp_path_factory.mktemp("tasks-run") / "w")
    enable_tasks(workdir)
    planned = planned_jobs(workdir)
    snakemake(workdir, "--cores", "2")
    return workdir, planned


def record(workdir: Path, model: str, variant: str, backend: str) -> dict:
    path = workdir / "results" / "eval" / model / "tasks" / f"{variant}-{backend}.json"
    return json.loads(path.read_text())


def headline(rec: dict, task: str) -> dict:
    return next(r for r in rec["results"] if r["task"] == task)


def server_gone(pid: int, port: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return port_is_free(port)
    return False


def test_enabling_tasks_runs_only_the_task_jobs_and_the_summary(tasks_run):
    _, planned = tasks_run
    assert planned == {
        "evaluate_tasks": 4,  # F16 and Q4_K_M of base and tuned
        "evaluate_tasks_transformers": 2,  # the HF folders
        "aggregate_stats": 1,
        "all": 1,
    }


@pytest.mark.slow
def test_every_variant_has_both_shipped_tasks_with_stderr_n_version_provenance(tasks_run):
    workdir, _ = tasks_run
    for model in ("smollm2", "smollm2-ft"):
        for variant, backend in (
            ("hf", "transformers"),
            ("F16", "llama.cpp"),
            ("Q4_K_M", "llama.cpp"),
        ):
            rec = record(workdir, model, variant, backend)
            assert rec["tasks"] == ["reverse_words", "gpl_cloze"] and rec["refused"] == []
            for task, metric in (("reverse_words", "exact_match"), ("gpl_cloze", "acc")):
                row = headline(rec, task)
                assert row["metric"] == metric and 0 <= row["value"] <= 1
                assert row["n"] == LIMIT and row["version"] == 1.0
                assert row["stderr"] is not None
            assert rec["provenance"]["packages"]["lm_eval"] == rec["lm_eval_version"]
            raw = (
                workdir / "results" / "eval" / model / "tasks" / f"{variant}-{backend}.lm-eval.json"
            )
            assert set(json.loads(raw.read_text())) == {"chat", "plain"}
            print(
                f"\n{model} {variant} ({backend}): "
                + ", ".join(f"{r['task']} {r['metric']} {r['value']:.3f} ± {r['stderr']:.3f}"
                            for r in rec["results"])
                + f"; {rec['seconds']:.0f} s"
            )  # fmt: skip


@pytest.mark.slow
def test_the_tuned_model_beats_the_base_on_reverse_words(tasks_run):
    workdir, _ = tasks_run
    for variant, backend in (("hf", "transformers"), ("F16", "llama.cpp")):
        base = headline(record(workdir, "smollm2", variant, backend), "reverse_words")["value"]
        tuned = headline(record(workdir, "smollm2-ft", variant, backend), "reverse_words")["value"]
        assert tuned > base, (variant, base, tuned)


@pytest.mark.slow
def test_hf_folder_and_f16_gguf_agree_within_their_stderr_on_multiple_choice(tasks_run):
    workdir, _ = tasks_run
    for model in ("smollm2", "smollm2-ft"):
        hf = headline(record(workdir, model, "hf", "transformers"), "gpl_cloze")
        f16 = headline(record(workdir, model, "F16", "llama.cpp"), "gpl_cloze")
        assert abs(hf["value"] - f16["value"]) <= math.hypot(hf["stderr"], f16["stderr"]), model


@pytest.mark.slow
def test_the_server_is_gone_after_each_job(tasks_run):
    workdir, _ = tasks_run
    for model in ("smollm2", "smollm2-ft"):
        for variant in ("F16", "Q4_K_M"):
            settings = record(workdir, model, variant, "llama.cpp")["settings"]
            assert settings["slots"] == 4
            assert server_gone(settings["server_pid"], settings["server_port"])


@pytest.mark.slow
def test_the_summary_has_accuracy_tables_base_vs_tuned_and_the_plot(tasks_run):
    workdir, _ = tasks_run
    page = (workdir / "results" / "stats" / "summary.md").read_text()
    assert page.count("### Task accuracy (lm-evaluation-harness)") == 2
    assert "### Task accuracy: smollm2 vs smollm2-ft" in page
    assert re.search(r"\| F16 \(llama\.cpp\)\s+\| \d\.\d{3} ± \d\.\d{3}", page)
    plot = workdir / "results" / "stats" / "plots" / "accuracy_vs_size.png"
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_failing_task_job_stops_its_server_and_leaves_no_output(default_run, tmp_path):
    workdir = copy_run(default_run, tmp_path / "w")
    tasks_dir = workdir / "config" / "eval" / "tasks"
    broken = yaml.safe_load((tasks_dir / "gpl_cloze.yaml").read_text())
    broken.update(task="broken", dataset_kwargs={"data_files": {"test": "broken.jsonl"}})
    (tasks_dir / "broken.yaml").write_text(yaml.safe_dump(broken))
    (tasks_dir / "broken.jsonl").write_text("{not json\n")
    enable_tasks(workdir, names=["broken"])
    target = "results/eval/smollm2/tasks/F16-llama.cpp.json"
    done = snakemake(workdir, "--cores", "2", target, check=False)
    assert done.returncode != 0
    log = (workdir / "logs" / "evaluate_tasks" / "smollm2-F16-llama.cpp.log").read_text()
    pid, port = map(int, SERVER_LINE.search(log).groups())
    assert f"llama-server pid {pid} stopped" in log
    assert server_gone(pid, port)
    assert not (workdir / target).exists()


@pytest.mark.slow
def test_sigterm_stops_the_server(default_run):
    """What Slurm sends at scancel or the time limit: the job unwinds and stops its server."""
    gguf = default_run / "results" / "gguf" / "smollm2" / "smollm2-F16.gguf"
    code = (
        "import sys, time\n"
        "from llmpipe.evaluation.server import LlamaServer, stop_on_sigterm\n"
        f"server = LlamaServer({str(gguf)!r}, slots=1, n_ctx=256, threads=1, n_gpu_layers=0,"
        f" log={str(default_run / 'sigterm-server.log')!r})\n"
        "with stop_on_sigterm(), server:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"
    )
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    started = job.stdout.readline()
    ready = job.stdout.readline()
    assert ready.strip() == "ready", started
    pid, port = map(int, SERVER_LINE.search(started).groups())
    assert not server_gone(pid, port)
    job.send_signal(signal.SIGTERM)
    assert job.wait(60) == 128 + signal.SIGTERM
    assert server_gone(pid, port)
