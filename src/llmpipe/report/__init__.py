"""aggregate_stats: every result of a run in one table, one page and a few pictures.

- ``results/stats/summary.csv``   one row per model x variant x backend (each eval JSON the
  workflow expected), with the weights' size and bits per weight, speed, quality, memory
  (measured and predicted) and the seed's hardware figures.
- ``results/stats/summary.md``    per model: the seed's "??" paragraph filled in, the figures,
  quality, speed and resources tables (``summary``).
- ``results/stats/resources.csv`` one row per job that recorded resources: the prediction it
  recorded (raw and with margins), the request, and the measured peaks.
- ``results/stats/plots/*.png``   quality loss vs size, tokens/s per variant, roofline %,
  predicted vs measured memory, tok/s per placement, the fine-tune loss curve of each model
  that has one, and task accuracy vs size when evaluate.tasks ran (``accuracy``).
- ``results/stats/provenance.json`` where and with what the numbers were made.

The report reads records only (``collect``), each one a named input of the rule: the eval
JSONs, the record of the weights each evaluation loaded, every job's record and benchmark, the
loss curves. ``tables`` builds the DataFrames and Markdown tables, ``plots`` the pictures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmpipe import atomic, provenance
from llmpipe.report import accuracy, collect, placements, plots, summary, tables
from llmpipe.report.tables import resources_table

__all__ = ["accuracy", "aggregate", "collect", "plots", "resources_table", "summary", "tables"]


def aggregate(
    *,
    eval_jsons: Sequence[str | os.PathLike],
    weights: Sequence[str | os.PathLike],
    jobs: Sequence[Sequence[str]],
    records: Sequence[str | os.PathLike],
    benchmarks: Sequence[str | os.PathLike],
    losses: Mapping[str, str | os.PathLike],
    out_csv: str | os.PathLike,
    out_md: str | os.PathLike,
    out_resources: str | os.PathLike,
    out_plots: str | os.PathLike,
    out_provenance: str | os.PathLike,
    gguf_notes: Mapping[str, str] | None = None,
    placement_jsons: Sequence[str | os.PathLike] = (),
    placement_notes: Mapping[str, str] | None = None,
    task_jsons: Sequence[str | os.PathLike] = (),
    tuned_bases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write every output of aggregate_stats; return counts (for the log).

    ``weights[i]``: the record of what ``eval_jsons[i]`` loaded (GGUF record or model manifest);
    ``jobs[i]`` = (rule, model, target) wrote ``records[i]``, benchmarked in ``benchmarks[i]``;
    ``losses``: {model: its fine-tune loss.csv}; ``placement_jsons``: the evaluate_placement
    records, ``placement_notes``: {placement: why this run did not measure it}; ``task_jsons``:
    the task records (evaluate.tasks); ``tuned_bases``: {tuned model: its base}, for
    base-vs-tuned accuracy.
    """
    evaluations = collect.read_evaluations(eval_jsons, weights)
    job_records = collect.read_jobs(jobs, records, benchmarks)
    curves = {model: collect.read_loss_csv(path) for model, path in losses.items()}
    summary_table = tables.summary_frame(evaluations)
    placement_table = placements.frame(placement_jsons)
    resource_table = tables.resource_frame(job_records, summary_table)
    task_table = accuracy.task_frame(task_jsons, summary_table)
    plots_dir = Path(out_plots)
    with atomic.atomic_dir(plots_dir) as tmp:
        made = [
            plots.plot_quality_vs_size(summary_table, tmp / "quality_vs_size.png"),
            plots.plot_tokens_per_s(summary_table, tmp / "tokens_per_s.png"),
            plots.plot_roofline(summary_table, tmp / "roofline.png"),
            plots.plot_resources(resource_table, tmp / "resources.png"),
        ]
        if placed := placements.plot(placement_table, tmp / "placements.png"):
            made.append(placed)
        accuracy_plot = accuracy.plot_accuracy_vs_size(task_table, tmp / "accuracy_vs_size.png")
        made += [accuracy_plot] if accuracy_plot else []
        finetune: dict[str, str] = {}
        for model, (xkey, series) in curves.items():
            name = f"finetune_loss_{model}.png"
            if plots.plot_loss(model, xkey, series, tmp / name):
                made.append(str(tmp / name))
                finetune[model] = f"plots/{name}"
    made_plots = [str(plots_dir / Path(p).name) for p in made]
    prov = provenance.collect()
    tables.write_csv(summary_table, tables.SUMMARY_COLUMNS, out_csv)
    tables.write_csv(resource_table, tables.RESOURCE_COLUMNS, out_resources)
    page = summary.markdown(
        summary_table,
        resource_table,
        made_plots,
        prov,
        finetune,
        gguf_notes or {},
        tasks=task_table,
        tuned_bases=tuned_bases or {},
        placements=placements.section(placement_table, placement_notes or {}),
    )
    atomic.write_text(out_md, page)
    atomic.write_json(
        out_provenance,
        {
            "aggregate": prov,
            "inputs": {
                "eval": [str(p) for p in eval_jsons],
                "tasks": [str(p) for p in task_jsons],
                "records": [str(p) for p in records],
                "loss": {model: str(path) for model, path in losses.items()},
            },
            "runs": {ev.path: (ev.record.get("provenance") or {}) for ev in evaluations},
        },
    )
    return {
        "rows": len(summary_table),
        "resources": len(resource_table),
        "placements": len(placement_table),
        "task_rows": len(task_table),
        "plots": len(made_plots),
    }
