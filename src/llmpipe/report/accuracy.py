"""Task accuracy in the report (evaluate.tasks): one row per model x variant x backend x task from
the flat task records, the per-model table (variant x task, value ± stderr), the base-vs-tuned
table and the accuracy-vs-size plot. A task's headline metric is the first one its record lists
(the first of the task's metric_list: exact_match, acc)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from llmpipe.errors import IntegrityError
from llmpipe.report.collect import read_record
from llmpipe.report.tables import MIB, fmt

COLUMNS = ["model", "variant", "backend", "task", "metric", "value", "stderr", "n", "size_bytes"]


def task_frame(paths: Sequence[str | os.PathLike], summary: pd.DataFrame) -> pd.DataFrame:
    """The headline metric of every task of every task record; ``size_bytes`` from the summary
    row of the same model x variant x backend (what was loaded)."""
    sizes = {
        (r.model, r.variant, r.backend): r.size_bytes
        for r in summary[["model", "variant", "backend", "size_bytes"]].itertuples()
    }
    rows = []
    for path in paths:
        record = read_record(path)
        for key in ("model", "variant", "backend", "results"):
            if key not in record:
                raise IntegrityError(f"{path}: task record without '{key}'")
        seen: set[str] = set()
        for r in record["results"]:
            if r["task"] in seen:
                continue
            seen.add(r["task"])
            ident = (record["model"], record["variant"], record["backend"])
            rows.append(
                {
                    "model": ident[0],
                    "variant": ident[1],
                    "backend": ident[2],
                    **{k: r.get(k) for k in ("task", "metric", "value", "stderr", "n")},
                    "size_bytes": sizes.get(ident),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def _cell(value, stderr) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    has_stderr = stderr is not None and pd.notna(stderr)
    return fmt(value, ".3f") + (f" ± {stderr:.3f}" if has_stderr else "")


def accuracy_table(tasks: pd.DataFrame) -> str:
    """variant (backend) x task: value ± stderr (n documents)."""
    if tasks.empty:
        return ""
    tasks = tasks.assign(label=tasks["variant"] + " (" + tasks["backend"] + ")")
    firsts = tasks[["task", "metric", "n"]].drop_duplicates("task")
    headers = {t: f"{t} ({m}, n={n})" for t, m, n in firsts.itertuples(index=False)}
    table = {
        label: {headers[r.task]: _cell(r.value, r.stderr) for r in part.itertuples()}
        for label, part in tasks.groupby("label", sort=False)
    }
    frame = pd.DataFrame.from_dict(table, orient="index")[list(headers.values())]
    frame.index.name = "Variant"
    return frame.reset_index().to_markdown(index=False, disable_numparse=True)


def base_vs_tuned_table(tasks: pd.DataFrame, base: str, tuned: str) -> str:
    """Per variant x task that both models have: base, tuned and the difference."""
    keys = ["variant", "backend", "task"]
    both = tasks[tasks["model"] == base].merge(
        tasks[tasks["model"] == tuned], on=keys, suffixes=("_base", "_tuned")
    )
    if both.empty:
        return ""
    rows = [
        {
            "Variant": f"{r.variant} ({r.backend})",
            "Task": f"{r.task} ({r.metric_base})",
            base: _cell(r.value_base, r.stderr_base),
            tuned: _cell(r.value_tuned, r.stderr_tuned),
            "Tuned - base": fmt(r.value_tuned - r.value_base, "+.3f"),
        }
        for r in both.itertuples()
    ]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def plot_accuracy_vs_size(tasks: pd.DataFrame, path: Path) -> str | None:
    """One panel per task: the headline metric (± stderr) against the loaded size in MiB."""
    points = tasks.dropna(subset=["size_bytes", "value"])
    if points.empty:
        return None
    from llmpipe.report.plots import _pyplot, _save

    plt = _pyplot()
    names = list(dict.fromkeys(points["task"]))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, task in zip(axes[0], names, strict=True):
        part = points[points["task"] == task]
        for (model, backend), series in part.groupby(["model", "backend"], sort=False):
            series = series.assign(mib=series["size_bytes"].astype(float) / MIB).sort_values("mib")
            ax.errorbar(
                series["mib"],
                series["value"].astype(float),
                yerr=series["stderr"].astype(float).fillna(0),
                fmt="o-" if backend == "llama.cpp" else "s--",
                capsize=3,
                label=f"{model} {backend}",
            )
            for r in series.itertuples():
                ax.annotate(r.variant, (r.mib, r.value), textcoords="offset points", xytext=(4, 4))
        ax.set_title(f"{task} ({part['metric'].iloc[0]})")
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
    return _save(fig, path)
