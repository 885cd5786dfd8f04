"""Task accuracy (config ``evaluate.tasks``): EleutherAI's lm-evaluation-harness on one model
variant, one job per model x variant x backend running the configured task group.

- ``transformers``: the HF folder (a base or a tuned model) through lm-eval's own ``hf`` model,
  float16 on a GPU, float32 on the CPU; ``trust_remote_code`` off.
- ``llama.cpp``: the GGUF as llama.cpp runs it, through llama.cpp's own ``llama-server``
  (``server.LlamaServer``: loopback, health-checked, stopped by PID) and our adapter
  (``lm_adapter.LlamaServerLM``) with as many requests in flight as the server has slots.

A task is a YAML file in ``evaluate.tasks.task_dir`` (``dataset_path: json`` + ``data_files``
beside it: offline) or, when no such file exists, a task of lm-eval's own registry (on the
cluster: with ``HF_DATASETS_OFFLINE=1`` and a datasets cache, config/README.md). Two files come
out: lm-eval's own results JSON and our flat record (``flatten``: one row per task x metric
with value, stderr, n and the task's version, plus provenance).
"""

from __future__ import annotations

import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from llmpipe import atomic, provenance
from llmpipe.errors import ConfigError
from llmpipe.resources import Usage

# Task types a backend cannot score, with the reason written into the record instead.
REFUSED = {
    "llama.cpp": {
        "loglikelihood_rolling": (
            "perplexity-style tasks need the log-probs of every prompt token; llama-server's "
            "endpoints return those of generated tokens only (evaluate_quality measures the "
            "GGUF's perplexity)"
        ),
    },
    "transformers": {},
}


def load_task(name: str, task_dir: str | os.PathLike) -> dict | str:
    """The task config of ``name``: its YAML in ``task_dir`` with ``data_files`` made absolute
    (lm-eval reads them relative to the working directory), or the bare name of an lm-eval
    registry task when there is no such file."""
    import yaml

    path = Path(task_dir) / f"{name}.yaml"
    if not path.is_file():
        return name
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or config.get("task") != name:
        raise ConfigError(f"{path}: expected an lm-eval task YAML with 'task: {name}'")
    files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        for split, rel in files.items():
            data = path.parent / rel
            if not data.is_file():
                raise ConfigError(f"{path}: data_files.{split}: {data} does not exist")
            files[split] = str(data.resolve())
    return config


def output_type(task: dict | str) -> str | None:
    return task.get("output_type") if isinstance(task, dict) else None


def uses_chat_template(task: dict | str, default: bool) -> bool:
    """A shipped task says so in its metadata (``chat_template``); others take the config's."""
    if isinstance(task, dict):
        return bool(task.get("metadata", {}).get("chat_template", default))
    return default


def task_name(task: dict | str) -> str:
    return task["task"] if isinstance(task, dict) else task


def flatten(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task x metric x filter of lm-eval's results dict: value, stderr, n, version.

    lm-eval keys its figures ``"<metric>,<filter>"`` and ``"<metric>_stderr,<filter>"``; a
    stderr it could not compute is the string "N/A" (here None).
    """
    rows = []
    for task, figures in sorted(results.get("results", {}).items()):
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in figures.items():
            if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            stderr = figures.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                    "n": n,
                    "version": results.get("versions", {}).get(task),
                }
            )
    return rows


def _hf_model(path: Path, tasks_cfg: dict, transformers_cfg: dict, threads: int):
    """lm-eval's hf model with evaluate.transformers' device and dtype, resolved as the
    transformers backend resolves them (``hf_backend.resolve``)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from llmpipe.evaluation.hf_backend import HFSettings, resolve

    device, dtype = resolve(HFSettings.from_config(transformers_cfg, threads))
    torch.set_num_threads(threads)
    model = HFLM(
        pretrained=str(path),
        batch_size=tasks_cfg["batch_size"],
        trust_remote_code=False,
        device=device,
        dtype=dtype,
    )
    return model, {"device": device, "dtype": dtype}


def task_manager(tasks: list):
    """lm-eval's task index: its registry of ~10 000 YAML files is read (a minute on two busy
    cores) only when a registry task is named; shipped tasks come as configs."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))


def run_group(lm, tasks: list, tasks_cfg: dict, chat: bool) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager(tasks),
        num_fewshot=tasks_cfg["num_fewshot"],
        limit=tasks_cfg["limit"],
        apply_chat_template=chat,
        fewshot_as_multiturn=chat and bool(tasks_cfg["num_fewshot"]),
        log_samples=False,
        random_seed=tasks_cfg["seed"],
        numpy_random_seed=tasks_cfg["seed"],
        torch_random_seed=tasks_cfg["seed"],
        fewshot_random_seed=tasks_cfg["seed"],
    )


def evaluate(lm, tasks: list, tasks_cfg: dict) -> dict[str, dict]:
    """lm-eval's results per chat-template setting ("chat", "plain"): one run each, as the
    harness applies a chat template to every task of a run or to none."""
    raw = {}
    for key, chat in (("chat", True), ("plain", False)):
        group = [t for t in tasks if uses_chat_template(t, tasks_cfg["chat_template"]) == chat]
        if group:
            raw[key] = run_group(lm, group, tasks_cfg, chat)
    return raw


def run_tasks(
    *,
    backend: str,
    model_id: str,
    variant: str,
    model_path: str | os.PathLike,
    tasks_cfg: dict,
    backend_cfg: dict,
    threads: int,
    out: str,
    raw_out: str,
    server_log: str,
    usage: Usage | None = None,
) -> dict:
    """Run the configured tasks on one variant; write lm-eval's JSON and our record."""
    from lm_eval.utils import handle_non_serializable

    tasks = [load_task(n, tasks_cfg["task_dir"]) for n in tasks_cfg["names"]]
    refused = [
        {"task": task_name(t), "reason": REFUSED[backend][output_type(t)]}
        for t in tasks
        if output_type(t) in REFUSED[backend]
    ]
    runnable = [t for t in tasks if output_type(t) not in REFUSED[backend]]
    start = time.perf_counter()
    if backend == "llama.cpp":
        raw, settings = _run_on_server(
            model_path, runnable, tasks_cfg, backend_cfg, threads, server_log
        )
    else:
        lm, settings = _hf_model(Path(model_path), tasks_cfg, backend_cfg, threads)
        raw = evaluate(lm, runnable, tasks_cfg) if runnable else {}
    seconds = time.perf_counter() - start
    rows = []
    for key, results in raw.items():
        rows += [{**row, "chat_template": key == "chat"} for row in flatten(results)]
    record = {
        "model": model_id,
        "variant": variant,
        "backend": backend,
        "tasks": [task_name(t) for t in tasks],
        "results": rows,
        "refused": refused,
        "num_fewshot": tasks_cfg["num_fewshot"],
        "limit": tasks_cfg["limit"],
        "batch_size": tasks_cfg["batch_size"],
        "settings": settings,
        "seconds": seconds,
        "lm_eval_version": metadata.version("lm_eval"),
        **(usage.fields() if usage else {}),
        "provenance": provenance.collect(seed=tasks_cfg["seed"]),
    }
    atomic.write_text(raw_out, json.dumps(raw, default=handle_non_serializable, indent=1))
    atomic.write_json(out, record)
    for row in rows:
        stderr = f" ± {row['stderr']:.3f}" if row["stderr"] is not None else ""
        print(f"{variant} ({backend}) {row['task']} {row['metric']}: {row['value']:.3f}{stderr}")
    return record


def _run_on_server(model_path, tasks, tasks_cfg, llama_cfg, threads, server_log):
    from llmpipe.evaluation.lm_adapter import LlamaServerLM
    from llmpipe.evaluation.server import LlamaServer, stop_on_sigterm

    slots = tasks_cfg["batch_size"]
    n_gpu_layers = llama_cfg["n_gpu_layers"]
    server = LlamaServer(
        model_path,
        slots=slots,
        n_ctx=tasks_cfg["n_ctx"],
        threads=llama_cfg["n_threads"] or threads,
        n_gpu_layers=n_gpu_layers,
        flash_attn=llama_cfg["flash_attn"],
        kv_type=llama_cfg["kv_type"],
        log=server_log,
    )
    settings = {
        "slots": slots,
        "n_ctx_per_slot": tasks_cfg["n_ctx"],
        "n_gpu_layers": n_gpu_layers,
        "threads": server.threads,
        "flash_attn": server.flash_attn,
        "kv_type": server.kv_type,
    }
    with stop_on_sigterm(), server:
        lm = LlamaServerLM(server.url, slots, Path(model_path).name)
        raw = evaluate(lm, tasks, tasks_cfg) if tasks else {}
        settings["server_pid"] = server.pid
        settings["server_port"] = server.port
    return raw, settings
