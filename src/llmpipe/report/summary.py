"""summary.md: per model the seed's "??" paragraph filled in with measured numbers (for every
backend's reference run), then the same figures for every variant, the quality table in the
style of llama.cpp's perplexity README, speed, and the resources the jobs were predicted to need
next to what they used."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from llmpipe.report.accuracy import accuracy_table, base_vs_tuned_table
from llmpipe.report.tables import (
    figures_table,
    fmt,
    quality_table,
    records,
    resources_table,
    si,
    speed_table,
)


def _device_words(device: str | None) -> tuple[str, str]:
    """(what the weights go to, what the memory traffic is) for the seed's sentences."""
    if not device or device == "cpu":
        return "the CPU's memory (device: CPU, no GPU)", "from main memory to the CPU"
    return f"the GPU ({device})", f"from VRAM to the GPU ({device})"


def seed_paragraph(row: Mapping[str, Any]) -> str:
    """The seed's recipe paragraph with every "??" replaced by this run's measured figures."""
    to_device, traffic = _device_words(row.get("device"))
    return (
        f"The expected evaluation time of the example below is {fmt(row.get('wall_s'))} "
        f"seconds. This example produces {fmt(row.get('generated_tokens'), '.0f')} tokens at an "
        f"average rate of {fmt(row.get('tokens_per_min'), '.1f')} tokens / min. During this "
        f"test a total of {fmt(row.get('gb_disk_to_device'), '.3f')} GB is transferred from the "
        f"disk to {to_device} and a total of {si(row.get('flops'))} ({row['compute_dtype']}) "
        f"operations are done. The total memory transfer {traffic} is "
        f"{fmt(row.get('decode_gb'), '.2f')} GB at an average rate of "
        f"{fmt(row.get('achieved_gb_s'))} GB/s and a peak of "
        f"{fmt(row.get('achieved_gb_s_max'))} GB/s (the device's measured peak bandwidth is "
        f"{fmt(row.get('peak_bandwidth_gb_s'), '.1f')} GB/s: "
        f"{fmt(row.get('roofline_pct'), '.1f')} % of the roofline)."
    )


def _model_section(
    model: str,
    rows: pd.DataFrame,
    resources: pd.DataFrame,
    finetune: Mapping[str, str],
    gguf_notes: Mapping[str, str],
    tasks: pd.DataFrame,
    base: str | None,
) -> list[str]:
    out = [f"## {model}", ""]
    if model in gguf_notes:
        out += [f"GGUF (llama.cpp): {gguf_notes[model]}.", ""]
    if not rows.empty:
        references = rows[rows["is_reference"].fillna(False)]
        out += ["### The recipe's figures", ""]
        for r in records(references if not references.empty else rows.head(1)):
            out += [f"**{r['variant']}, {r['backend']}** — {seed_paragraph(r)}", ""]
        out += [figures_table(rows), "", "### Quality", "", quality_table(rows), ""]
        out += ["### Speed and memory", "", speed_table(rows), ""]
    own = tasks[tasks["model"] == model]
    if not own.empty:
        out += ["### Task accuracy (lm-evaluation-harness)", "", accuracy_table(own), ""]
    vs_base = base_vs_tuned_table(tasks, base, model) if base else ""
    if vs_base:
        out += [f"### Task accuracy: {base} vs {model}", "", vs_base, ""]
    if not resources.empty:
        out += ["### Resources: predicted vs measured", "", resources_table(resources), ""]
    if model in finetune:
        out += [f"Fine-tune loss curve: `{finetune[model]}`.", ""]
    return out


def markdown(
    summary: pd.DataFrame,
    resources: pd.DataFrame,
    plots: Sequence[str],
    prov: Mapping[str, Any],
    finetune: Mapping[str, str] | None = None,
    gguf_notes: Mapping[str, str] | None = None,
    tasks: pd.DataFrame | None = None,
    tuned_bases: Mapping[str, str] | None = None,
    placements: Sequence[str] = (),
) -> str:
    """summary.md; ``finetune``: {model: its loss plot}; ``gguf_notes``: {model: why its GGUF
    steps were not run (or were forced)}; ``tasks``: task accuracy rows (report.accuracy);
    ``tuned_bases``: {tuned model: its base}; ``placements``: the placements section's lines."""
    finetune, gguf_notes, tuned_bases = finetune or {}, gguf_notes or {}, tuned_bases or {}
    if tasks is None:
        tasks = pd.DataFrame(columns=["model"])
    models = list(dict.fromkeys([*summary["model"], *resources["model"], *gguf_notes]))
    by_model = dict(tuple(summary.groupby("model", sort=False)))
    resources_by_model = dict(tuple(resources.groupby("model", sort=False)))
    out = [
        "# Results summary",
        "",
        f"{len(summary)} evaluations of {len(models)} model(s). Host `{prov.get('host')}`, "
        f"CPU {prov.get('cpu')} ({prov.get('cpu_count')} cores), GPUs: "
        f"{', '.join(g['name'] for g in prov.get('gpus') or []) or 'none'}; workflow commit "
        f"`{(prov.get('git') or {}).get('commit')}`. Memory in MiB; GB = 1e9 bytes.",
        "",
    ]
    for model in models:
        out += _model_section(
            model,
            by_model.get(model, summary.iloc[0:0]),
            resources_by_model.get(model, resources.iloc[0:0]),
            finetune,
            gguf_notes,
            tasks,
            tuned_bases.get(model),
        )
    out += list(placements)
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots] + [""]
    out += [
        "## Notes",
        "",
        "- PPL ratio, KLD and same-top are measured against each model's reference variant with "
        "the method of llama.cpp's `llama-perplexity --kl-divergence`.",
        "- Predicted memory is the estimator's raw peak (llmpipe.estimate); the request adds "
        "the margin (x1.25) and scales with the retry attempt. 'As run' counts RAM-disk bytes "
        "only when the job wrote them.",
        "- Task accuracy: lm-evaluation-harness, each task's first metric, ± its standard error "
        "over n documents (evaluate.tasks.limit caps n); GGUF variants scored by llama.cpp's "
        "llama-server (llmpipe.evaluation.lm_adapter).",
        "",
    ]
    return "\n".join(out)
