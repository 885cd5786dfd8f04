"""Read and check the files aggregate_stats is given.

Every path is a named input of the rule, listed by ``workflow/rules/report.smk`` together with
the identity of the job that wrote it: this module guesses no path and no name. A record is the
JSON a job wrote beside its output; a benchmark the TSV Snakemake wrote for the job. A missing,
unreadable or inconsistent file is one ``IntegrityError`` naming it: no row is ever dropped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe.errors import IntegrityError

WEIGHT_KEYS = ("size_bytes", "bits_per_weight", "n_params")


@dataclass(frozen=True)
class Evaluation:
    """One eval JSON (model x variant x backend) and the figures of the weights it loaded."""

    path: str
    record: dict[str, Any]
    weights: dict[str, Any]  # WEIGHT_KEYS

    @property
    def predicted(self) -> dict[str, Any]:
        return self.record["predicted"]


@dataclass(frozen=True)
class Job:
    """One job whose resources the report shows: its rule, the model, the variant it made or
    scored (``target``, empty for per-model jobs), its record and Snakemake's benchmark."""

    rule: str
    model: str
    target: str
    path: str
    record: dict[str, Any]
    benchmark: dict[str, float | None]  # benchmark_max_rss_mb, benchmark_s

    @property
    def predicted(self) -> dict[str, Any]:
        return self.record["predicted"]

    @property
    def measured(self) -> dict[str, Any]:
        return self.record["measured"]


def number(value: Any) -> float | None:
    """A finite float, or None (missing, not a number, NaN or infinite)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON record that must exist and be an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path}: expected result is missing") from None
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path}: unreadable result ({err})") from err
    if not isinstance(data, dict):
        raise IntegrityError(f"{path}: expected a JSON object")
    return data


def _require(path: str | os.PathLike, record: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise IntegrityError(f"{path}: no {', '.join(map(repr, missing))} in the record")


def _require_mapping(path: str | os.PathLike, record: Mapping[str, Any], key: str) -> None:
    _require(path, record, key)
    if not isinstance(record[key], Mapping):
        raise IntegrityError(f"{path}: {key!r} is {record[key]!r}, expected an object")


def _check_same(path: str | os.PathLike, record: Mapping[str, Any], **expected: str) -> None:
    """The record's own model/variant/backend, where it states one, is the expected one."""
    for key, want in expected.items():
        if key in record and record[key] != want:
            raise IntegrityError(f"{path}: {key} is {record[key]!r}, expected {want!r}")


def read_weights(path: str | os.PathLike, model: str, variant: str) -> dict[str, Any]:
    """Size, bits per weight and parameter count of what an evaluation loaded: a GGUF record
    has them at its top level, a model folder's manifest in its ``weights``."""
    record = read_record(path)
    if "weights" in record:  # results/models/{model}/manifest.json
        _check_same(path, record, model=model)
        _require_mapping(path, record, "weights")
        figures = record["weights"]
    else:  # results/gguf/{model}/{model}-{variant}.json
        _check_same(path, record, variant=variant)
        figures = record
    _require(path, figures, *WEIGHT_KEYS)
    return {k: figures[k] for k in WEIGHT_KEYS}


def read_evaluations(
    eval_jsons: Sequence[str | os.PathLike], weights: Sequence[str | os.PathLike]
) -> list[Evaluation]:
    """Every eval JSON with the record of its weights (``weights[i]`` belongs to
    ``eval_jsons[i]``), in the given order; each model x variant x backend once."""
    if len(eval_jsons) != len(weights):
        raise IntegrityError(
            f"aggregate_stats: {len(eval_jsons)} eval JSONs but {len(weights)} weight records"
        )
    out: list[Evaluation] = []
    seen: dict[tuple[str, str, str], str] = {}
    for raw, weights_path in zip(eval_jsons, weights, strict=True):
        record = read_record(raw)
        _require(raw, record, "model", "variant", "backend")
        _require_mapping(raw, record, "predicted")
        key = (record["model"], record["variant"], record["backend"])
        if key in seen:
            raise IntegrityError(f"{raw}: {' '.join(key)} also in {seen[key]}")
        seen[key] = str(raw)
        figures = read_weights(weights_path, record["model"], record["variant"])
        out.append(Evaluation(str(raw), record, figures))
    return out


def read_benchmark(path: str | os.PathLike) -> dict[str, float | None]:
    """Snakemake's benchmark of a job: the last run's peak RSS (MiB) and wall time (s)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep="\t")
    except FileNotFoundError:
        raise IntegrityError(f"{path}: expected benchmark is missing") from None
    except (OSError, ValueError) as err:  # pandas' parser errors are ValueErrors
        raise IntegrityError(f"{path}: unreadable benchmark ({err})") from err
    if frame.empty or not {"s", "max_rss"} <= set(frame.columns):
        raise IntegrityError(f"{path}: expected a Snakemake benchmark (columns s, max_rss)")
    last = frame.iloc[-1]
    return {"benchmark_max_rss_mb": number(last["max_rss"]), "benchmark_s": number(last["s"])}


def read_jobs(
    ids: Sequence[Sequence[str]],
    records: Sequence[str | os.PathLike],
    benchmarks: Sequence[str | os.PathLike],
) -> list[Job]:
    """The jobs ``ids[i]`` = (rule, model, target) with their ``records[i]`` and
    ``benchmarks[i]``. Each record holds the job's ``predicted`` and ``measured`` resources,
    written by that rule (``predicted.rule``) for that model."""
    if not len(ids) == len(records) == len(benchmarks):
        raise IntegrityError(
            f"aggregate_stats: {len(ids)} jobs, {len(records)} records and {len(benchmarks)} "
            "benchmarks: expected one record and one benchmark per job"
        )
    jobs = []
    for (rule, model, target), path, benchmark in zip(ids, records, benchmarks, strict=True):
        record = read_record(path)
        _require_mapping(path, record, "predicted")
        _require_mapping(path, record, "measured")
        _check_same(path, record, model=model)
        _check_same(path, record["predicted"], rule=rule)
        jobs.append(Job(rule, model, target, str(path), record, read_benchmark(benchmark)))
    return jobs


def read_loss_csv(path: str | os.PathLike) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """x column name and {series: [(x, y), ...]} from a fine-tune loss.csv: long format
    (``step, split, loss``: one series per split, e.g. train and heldout) or wide format (one
    series per column with "loss" in its name). Rows without a number are left out."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path}: unreadable loss curve ({err})") from err
    xkey = next((k for k in ("step", "global_step", "epoch") if k in frame.columns), None)
    x = pd.to_numeric(frame[xkey], errors="coerce") if xkey else pd.Series(range(len(frame)))
    if "split" in frame.columns and "loss" in frame.columns:
        frame = frame.assign(_x=x, _y=pd.to_numeric(frame["loss"], errors="coerce"))
        groups = {str(name): part for name, part in frame.groupby("split", sort=False)}
    else:
        groups = {
            k: frame.assign(_x=x, _y=pd.to_numeric(frame[k], errors="coerce"))
            for k in frame.columns
            if "loss" in k.lower()
        }
    series = {}
    for name, part in groups.items():
        points = part[["_x", "_y"]].dropna()
        if not points.empty:
            series[name] = [(float(a), float(b)) for a, b in points.itertuples(index=False)]
    return xkey or "row", series
