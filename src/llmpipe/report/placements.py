"""The placements section of the summary: one GGUF per model on each placement that ran (CPU,
GPUs, several hosts), prefill and decode tok/s, load time and GB moved, and the placements this
run could not measure with the reason (the guide's comparison table)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from llmpipe.report import collect
from llmpipe.report.tables import fmt, text

COLUMNS = (
    "model", "variant", "placement", "description", "where", "threads", "prefill_tok_s",
    "prefill_sd", "decode_tok_s", "decode_sd", "load_s", "gb_moved", "load_gb_per_s",
)  # fmt: skip


def frame(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    rows = []
    for path in paths:
        r = collect.read_record(path)
        collect._require(path, r, "model", "variant", "placement", "load_s", "gb_moved")
        rows.append(
            {
                "model": r["model"],
                "variant": r["variant"],
                "placement": r["placement"]["name"],
                "description": r.get("description"),
                "where": r.get("where"),
                "threads": r.get("threads"),
                "prefill_tok_s": r.get("pp_tok_s"),
                "prefill_sd": r.get("pp_sd"),
                "decode_tok_s": r.get("tg_tok_s"),
                "decode_sd": r.get("tg_sd"),
                "load_s": r["load_s"],
                "gb_moved": r["gb_moved"],
                "load_gb_per_s": r.get("load_gb_per_s"),
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def section(table: pd.DataFrame, not_run: Mapping[str, str]) -> list[str]:
    """Markdown lines of the placements section (nothing when placements are off)."""
    if table.empty and not not_run:
        return []
    out = [
        "## Placements",
        "",
        "One GGUF on each placement (llama-bench's tests: a prompt of n_prompt tokens in one "
        "batch, n_gen single-token decodes; mean ± sd over the repetitions). Several hosts run "
        "llama.cpp's RPC backend; `local` = rpc-servers on 127.0.0.1 (the RPC path, no network).",
        "",
    ]
    if not table.empty:
        out += [
            "| Model | Variant | Placement | Where | Prefill tok/s | Decode tok/s (1 sequence) | "
            "Load s | GB moved | Load GB/s |",
            "|:--|:--|:--|:--|--:|--:|--:|--:|--:|",
        ]
        for r in table.to_dict("records"):
            out.append(
                f"| {r['model']} | {r['variant']} | {r['placement']} ({text(r['description'])}) "
                f"| {text(r['where'])} | {fmt(r['prefill_tok_s'], '.1f')} ± "
                f"{fmt(r['prefill_sd'], '.1f')} | {fmt(r['decode_tok_s'], '.1f')} ± "
                f"{fmt(r['decode_sd'], '.1f')} | {fmt(r['load_s'], '.2f')} | "
                f"{fmt(r['gb_moved'], '.3f')} | {fmt(r['load_gb_per_s'], '.2f')} |"
            )
        out.append("")
    if not_run:
        out += ["Not run here:", ""]
        out += [f"- `{name}`: {why}" for name, why in not_run.items()]
        out.append("")
    return out


def plot(table: pd.DataFrame, path: Path) -> str | None:
    """Prefill and decode tok/s per placement, one group of bars per model."""
    if table.empty:
        return None
    from llmpipe.report.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{m}\n{p}" for m, p in zip(table["model"], table["placement"], strict=True)]
    for ax, key, title in (
        (axes[0], "prefill_tok_s", "Prefill (prompt) tok/s"),
        (axes[1], "decode_tok_s", "Decode tok/s (one sequence)"),
    ):
        values = [float(v) if v is not None else 0.0 for v in table[key]]
        errors = [float(v) if v is not None else 0.0 for v in table[key.replace("tok_s", "sd")]]
        ax.bar(range(len(values)), values, yerr=errors, color="#4c72b0")
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
    fig.suptitle("One GGUF per placement (CPU, GPUs, hosts over RPC)")
    return _save(fig, path)
