"""The report's tables as pandas DataFrames: the summary (one row per evaluation), the
resources (one row per job), their CSV files and the Markdown tables of summary.md.

Every value comes from a record (``llmpipe.report.collect``); nothing is re-estimated. Each CSV
column has one type, so a column reads the same in every row: integers as integers, other
numbers with 6 significant digits, an empty cell where a record has no value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from llmpipe import atomic
from llmpipe.errors import IntegrityError
from llmpipe.report.collect import Evaluation, Job, number

MIB = 2**20
TEXT, INT, FLOAT = "string", "Int64", "Float64"

# summary.csv: the columns first, then context.
SUMMARY_COLUMNS: dict[str, str] = {
    "model": TEXT,
    "variant": TEXT,
    "backend": TEXT,
    "size_bytes": INT,
    "bits_per_weight": FLOAT,
    "load_s": FLOAT,
    "prefill_tok_s": FLOAT,
    # decode: all sequences together, and what one prompt's stream sees (farm.decode_speeds)
    "decode_tok_s_aggregate": FLOAT,
    "decode_tok_s_per_sequence": FLOAT,
    "tokens_per_min": FLOAT,
    "wall_s": FLOAT,
    "ppl": FLOAT,
    "ppl_ratio": FLOAT,
    "kld_mean": FLOAT,
    "same_top_pct": FLOAT,
    "peak_rss_mb": FLOAT,
    "peak_vram_mb": FLOAT,
    "predicted_mem_mb": FLOAT,
    "gb_disk_to_device": FLOAT,
    "flops": FLOAT,
    "achieved_gb_s": FLOAT,
    "roofline_pct": FLOAT,
    # context
    "device": TEXT,
    "load_source": TEXT,
    "prompt_tokens": INT,
    "generated_tokens": INT,
    "decode_sequences": INT,  # prompts decoded together at most (parallel, batch_size)
    "kld_p99": FLOAT,
    "bytes_per_token": FLOAT,
    "peak_bandwidth_gb_s": FLOAT,
    "achieved_gb_s_max": FLOAT,
    "decode_gb": FLOAT,
    "n_params": INT,
    "predicted_request_mem_mb": INT,
    "host": TEXT,
    "git_commit": TEXT,
    "eval_json": TEXT,
}
# Columns the Markdown page needs beside the CSV's (not written to summary.csv).
SUMMARY_EXTRA: dict[str, str] = {
    "step": TEXT,  # the estimator step the evaluation jobs were planned with
    "compute_dtype": TEXT,  # what the operations were done in, for the seed's "(float??)"
    "is_reference": "boolean",  # the run the others' quality is measured against
}

RESOURCE_COLUMNS: dict[str, str] = {
    "rule": TEXT,
    "model": TEXT,
    "target": TEXT,
    "basis": TEXT,
    "predicted_peak_mb": FLOAT,
    "predicted_shm_mb": FLOAT,
    "predicted_as_run_mb": FLOAT,
    "predicted_mem_mb": INT,
    "requested_mem_mb": INT,
    "measured_peak_rss_mb": FLOAT,
    "measured_shm_mb": FLOAT,
    "measured_peak_mem_mb": FLOAT,
    "mem_ratio": FLOAT,
    "predicted_gpu_mem_mb": INT,
    "measured_gpu_mem_mb": FLOAT,
    "predicted_runtime_s": FLOAT,
    "predicted_runtime_min": INT,
    "requested_runtime_min": INT,
    "measured_wall_s": FLOAT,
    "mean_cpu_pct": FLOAT,
    "benchmark_max_rss_mb": FLOAT,
    "benchmark_s": FLOAT,
    "record": TEXT,
}


def frame(
    rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str], source: str
) -> pd.DataFrame:
    """A DataFrame of ``rows`` with exactly ``columns``, each of its type; a value that does not
    fit its column is an error naming the column and the row's ``source`` file."""
    out = pd.DataFrame(list(rows), columns=list(columns), dtype=object)
    for column, dtype in columns.items():
        values = [_plain(v) for v in out[column]]
        try:
            out[column] = pd.array(values, dtype=dtype)
        except (TypeError, ValueError) as err:
            bad = next(i for i, v in enumerate(values) if not _fits(v, dtype))
            raise IntegrityError(
                f"{out[source].iloc[bad]}: {column} is {values[bad]!r}, expected {dtype} ({err})"
            ) from err
    return out


def _plain(value: Any) -> Any:
    """None for a missing or non-finite number; lists joined with ';'."""
    if isinstance(value, float):
        return number(value)
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return value


def _fits(value: Any, dtype: str) -> bool:
    try:
        pd.array([value], dtype=dtype)
    except (TypeError, ValueError):
        return False
    return True


def write_csv(table: pd.DataFrame, columns: Mapping[str, str], path: str | os.PathLike) -> None:
    atomic.write_text(
        path,
        table.to_csv(columns=list(columns), index=False, float_format="%.6g", lineterminator="\n"),
    )


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows as plain dicts, None where a value is missing (for per-row text and plots)."""
    plain = table.astype(object)
    return plain.where(plain.notna(), None).to_dict("records")


# --------------------------------------------------------------------------------------------
# Summary: one row per evaluation
# --------------------------------------------------------------------------------------------


def compute_dtype(record: Mapping[str, Any]) -> str:
    """What an evaluation's operations were done in, for the seed's "(float??)"."""
    if record["backend"] == "transformers":
        settings = record.get("settings") or {}
        return str(settings.get("resolved_dtype") or settings.get("dtype") or "float32")
    device = record.get("device") or "cpu"
    # ggml computes quantized matmuls as int8/f32 dot products on the CPU, f16 on CUDA.
    acc = "float32" if device == "cpu" else "float16"
    return f"{acc}, weights {record['variant']}"


def summary_row(ev: Evaluation) -> dict[str, Any]:
    record, predicted = ev.record, ev.predicted
    totals = record.get("totals") or {}
    prov = record.get("provenance") or {}
    decode_bytes = number(totals.get("decode_bytes"))
    # on a GPU the number to compare is VRAM: the peak per GPU
    peak = predicted.get("gpu_mem_mb") if predicted.get("gpus") else predicted.get("peak_mb")
    reference = record.get("quality_reference")
    return {
        **ev.weights,
        **{k: record[k] for k in SUMMARY_COLUMNS if k in record},
        "predicted_mem_mb": peak,
        "predicted_request_mem_mb": predicted.get("mem_mb"),
        "device": record.get("device") or ",".join(totals.get("devices") or []) or None,
        "achieved_gb_s_max": totals.get("achieved_gb_s_max"),
        "decode_gb": round(decode_bytes / 1e9, 6) if decode_bytes is not None else None,
        "host": prov.get("host"),
        "git_commit": (prov.get("git") or {}).get("commit"),
        "eval_json": ev.path,
        "step": predicted.get("step"),
        "compute_dtype": compute_dtype(record),
        "is_reference": (
            reference == record["variant"] if reference else number(record.get("ppl_ratio")) == 1
        ),
    }


def summary_frame(evaluations: Sequence[Evaluation]) -> pd.DataFrame:
    """One row per evaluation, in the order given (the order the workflow expects them in)."""
    rows = [summary_row(ev) for ev in evaluations]
    return frame(rows, {**SUMMARY_COLUMNS, **SUMMARY_EXTRA}, source="eval_json")


# --------------------------------------------------------------------------------------------
# Resources: one row per job
# --------------------------------------------------------------------------------------------


def ratio(predicted: Any, measured: Any) -> float | None:
    """predicted / measured, or None when either is missing or zero."""
    p, m = number(predicted), number(measured)
    if not p or not m:
        return None
    value = p / m
    return round(value, 3) if abs(value) != float("inf") else None


def as_run_mb(predicted: Mapping[str, Any], measured: Mapping[str, Any]) -> float | None:
    """The prediction for the job as it ran: the RAM-disk bytes count only when the job wrote
    them (a staged copy that was already there costs this job nothing)."""
    peak = number(predicted.get("peak_mb"))
    if peak is None:
        return None
    shm = number(predicted.get("shm_mb")) or 0.0
    wrote = (number(measured.get("shm_mb")) or 0.0) > 0
    return round(peak if wrote else peak - shm, 1)


def job_row(job: Job) -> dict[str, Any]:
    pred, meas = job.predicted, job.measured
    requested = pred.get("requested") or {}
    as_run = as_run_mb(pred, meas)
    return {
        "rule": job.rule,
        "model": job.model,
        "target": job.target,
        "basis": pred.get("basis"),
        "predicted_peak_mb": pred.get("peak_mb"),
        "predicted_shm_mb": pred.get("shm_mb"),
        "predicted_as_run_mb": as_run,
        "predicted_mem_mb": pred.get("mem_mb"),
        "requested_mem_mb": requested.get("mem_mb"),
        "measured_peak_rss_mb": meas.get("peak_rss_mb"),
        "measured_shm_mb": meas.get("shm_mb"),
        "measured_peak_mem_mb": meas.get("peak_mem_mb"),
        "mem_ratio": ratio(as_run, meas.get("peak_mem_mb")),
        "predicted_gpu_mem_mb": pred.get("gpu_mem_mb") or None,
        "measured_gpu_mem_mb": meas.get("peak_gpu_mem_mb"),
        "predicted_runtime_s": pred.get("runtime_s"),
        "predicted_runtime_min": pred.get("runtime_min"),
        "requested_runtime_min": requested.get("runtime_min"),
        "measured_wall_s": meas.get("wall_s"),
        "mean_cpu_pct": meas.get("mean_cpu_pct"),
        **job.benchmark,
        "record": job.path,
    }


def evaluation_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation (the shard that used the most memory) as a job row, from its summary row."""
    on_gpu = row["peak_vram_mb"] not in (None, 0)
    measured = row["peak_vram_mb"] if on_gpu else row["peak_rss_mb"]
    return {
        "rule": row["step"],
        "model": row["model"],
        "target": f"{row['variant']}-{row['backend']}",
        "basis": "the job's own prediction",
        "predicted_peak_mb": row["predicted_mem_mb"],
        "predicted_as_run_mb": row["predicted_mem_mb"],
        "predicted_mem_mb": row["predicted_request_mem_mb"],
        "measured_peak_rss_mb": row["peak_rss_mb"],
        "measured_peak_mem_mb": measured,
        "mem_ratio": ratio(row["predicted_mem_mb"], measured),
        "measured_gpu_mem_mb": row["peak_vram_mb"],
        "measured_wall_s": row["wall_s"],
        "record": row["eval_json"],
    }


def resource_frame(jobs: Sequence[Job], summary: pd.DataFrame) -> pd.DataFrame:
    """One row per job record, then one per evaluation."""
    rows = [job_row(job) for job in jobs] + [evaluation_row(r) for r in records(summary)]
    return frame(rows, RESOURCE_COLUMNS, source="record")


# --------------------------------------------------------------------------------------------
# Markdown tables
# --------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".2f", missing: str = "n/a") -> str:
    num = number(value)
    return missing if num is None else format(num, spec)


def si(value: Any, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 1.23e12 -> '1.23 T'."""
    num = number(value)
    if num is None:
        return "n/a"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(num) >= factor:
            return f"{num / factor:.3g} {prefix}{unit}"
    return f"{num:.3g} {unit}".rstrip()


def text(value: Any, missing: str = "n/a") -> str:
    return missing if value is None or value is pd.NA or value == "" else str(value)


Cell = Callable[[Mapping[str, Any]], str]


def markdown_table(table: pd.DataFrame, cells: Mapping[str, Cell], align: str = "") -> str:
    """A pipe table: one column per ``cells`` entry (header -> the row's cell text)."""
    align = align or "l" + "r" * (len(cells) - 1)
    rows = records(table)
    body = pd.DataFrame([[cell(r) for cell in cells.values()] for r in rows], columns=list(cells))
    colalign = ["left" if a == "l" else "right" for a in align]
    return body.to_markdown(index=False, disable_numparse=True, colalign=colalign)


def _label(r: Mapping[str, Any]) -> str:
    return f"{r['variant']} ({r['backend']})"


def _size_mib(r: Mapping[str, Any]) -> float | None:
    size = number(r.get("size_bytes"))
    return size / MIB if size else None


def quality_table(summary: pd.DataFrame) -> str:
    """llama.cpp perplexity README style: one line per variant, reference first."""
    cells: dict[str, Cell] = {
        "Variant": _label,
        "Size (MiB)": lambda r: fmt(_size_mib(r), ".1f"),
        "BPW": lambda r: fmt(r["bits_per_weight"], ".2f"),
        "PPL": lambda r: fmt(r["ppl"], ".4f"),
        "PPL ratio": lambda r: fmt(r["ppl_ratio"], ".4f"),
        "KLD mean": lambda r: fmt(r["kld_mean"], ".6f"),
        "Same top %": lambda r: fmt(r["same_top_pct"], ".2f"),
    }
    return markdown_table(summary, cells)


def speed_table(summary: pd.DataFrame) -> str:
    cells: dict[str, Cell] = {
        "Variant": _label,
        "Device": lambda r: text(r["device"]),
        "Load s": lambda r: fmt(r["load_s"]),
        "Loaded from": lambda r: text(r["load_source"]),
        "Prefill tok/s": lambda r: fmt(r["prefill_tok_s"], ".1f"),
        "Decode tok/s aggregate": lambda r: fmt(r["decode_tok_s_aggregate"], ".1f"),
        "Decode tok/s per sequence": lambda r: fmt(r["decode_tok_s_per_sequence"], ".1f"),
        "Sequences": lambda r: fmt(r["decode_sequences"], ".0f"),
        "Tokens/min": lambda r: fmt(r["tokens_per_min"], ".0f"),
        "GB/s": lambda r: fmt(r["achieved_gb_s"]),
        "Roofline %": lambda r: fmt(r["roofline_pct"], ".1f"),
        "Peak RSS MiB": lambda r: fmt(r["peak_rss_mb"], ".0f"),
        "Peak VRAM MiB": lambda r: fmt(r["peak_vram_mb"], ".0f", missing="-"),
        "Predicted MiB": lambda r: fmt(r["predicted_mem_mb"], ".0f"),
    }
    return markdown_table(summary, cells, "llrl" + "r" * 10)


def figures_table(summary: pd.DataFrame) -> str:
    """The seed's figures for every variant (the paragraph's numbers as columns)."""
    cells: dict[str, Cell] = {
        "Variant": _label,
        "Eval time s": lambda r: fmt(r["wall_s"]),
        "Tokens": lambda r: fmt(r["generated_tokens"], ".0f"),
        "Tokens/min": lambda r: fmt(r["tokens_per_min"], ".1f"),
        "GB disk to device": lambda r: fmt(r["gb_disk_to_device"], ".3f"),
        "Operations": lambda r: si(r["flops"]),
        "Memory traffic GB": lambda r: fmt(r["decode_gb"], ".2f"),
        "Avg GB/s": lambda r: fmt(r["achieved_gb_s"]),
        "Peak GB/s": lambda r: fmt(r["achieved_gb_s_max"]),
    }
    return markdown_table(summary, cells)


def resources_table(resources: pd.DataFrame | Sequence[Mapping[str, Any]]) -> str:
    """Predicted vs measured per job (also from resources.csv's rows, read as text)."""
    if not isinstance(resources, pd.DataFrame):
        resources = pd.DataFrame(list(resources), columns=list(RESOURCE_COLUMNS))
    multi = resources["model"].nunique() > 1

    def target(r: Mapping[str, Any]) -> str:
        parts = [r["model"] if multi else "", r["target"] or ""]
        return " ".join(p for p in parts if p) or "-"

    cells: dict[str, Cell] = {
        "Rule": lambda r: str(r["rule"]),
        "Target": target,
        "Predicted peak MiB": lambda r: fmt(r["predicted_as_run_mb"], ".0f"),
        "Measured peak MiB": lambda r: fmt(r["measured_peak_mem_mb"], ".0f"),
        "Ratio": lambda r: fmt(r["mem_ratio"], ".2f"),
        "With margin MiB": lambda r: fmt(r["predicted_mem_mb"], ".0f", missing="-"),
        "Requested MiB": lambda r: fmt(r["requested_mem_mb"], ".0f", missing="-"),
        "Predicted s": lambda r: fmt(r["predicted_runtime_s"], ".0f", missing="-"),
        "Measured s": lambda r: fmt(r["measured_wall_s"], ".1f"),
    }
    return markdown_table(resources, cells, "ll" + "r" * 7)
