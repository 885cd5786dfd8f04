"""Resources on the real workflow: the dry run's fallback requests, predicted vs measured."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import make_workdir, parse_job_stats, snakemake

from llmpipe import report
from llmpipe import resources as res

pytestmark = pytest.mark.workflow
TOLERANCE = 0.25


def test_dry_run_shows_fallback_requests(tmp_path):
    """Before any config.json exists the planner shows the conservative fallback."""
    workdir = make_workdir(tmp_path / "fresh")
    out = snakemake(workdir, "-n", "results/staged/smollm2/stage.json")
    mem, runtime = res.FALLBACK["cache_to_shm"]
    assert f"runtime={runtime}, mem_mb={mem}" in out.stdout
    assert parse_job_stats(out.stdout + out.stderr) == {"download": 1, "cache_to_shm": 1}


def _foundation_records(run: Path) -> list[Path]:
    """download (base models: a tuned model's folder comes from merge_lora), cache_to_shm,
    convert_to_gguf and quantize records of the run."""
    config = yaml.safe_load((run / "config" / "config.yaml").read_text())
    manifests = [run / "results" / "models" / m / "manifest.json" for m in config["models"]]
    staged = sorted(run.glob("results/staged/*/stage.json"))
    return [*manifests, *staged, *sorted(run.glob("results/gguf/*/*.json"))]


def _job_records(run: Path) -> list[Path]:
    """Every record a heavy job wrote: the foundation's, the tuned model's manifest (merge),
    the evaluation shards' and the perplexity jobs'."""
    return [
        *_foundation_records(run),
        *sorted(run.glob("results/models/*-ft/manifest.json")),
        *sorted(run.glob("results/eval/*/shards/*/*.json")),
        *sorted(run.glob("results/eval/*/reference-*.json")),
        *sorted(run.glob("results/eval/*/quality/*.json")),
        *sorted(run.glob("results/finetune/*/comparison.json")),
    ]


def test_every_job_record_has_prediction_and_measurement(default_run):
    records = _job_records(default_run)
    rules = set()
    for path in records:
        record = json.loads(path.read_text())
        pred, meas = record["predicted"], record["measured"]
        rules.add(pred.get("rule") or pred["step"])
        assert pred["basis"].endswith("config.json"), path
        assert pred["peak_mb"] > 0 and pred["mem_mb"] >= pred["peak_mb"]
        assert pred["runtime_min"] >= 1 and pred["runtime_s"] > 0
        assert pred["requested"]["mem_mb"] >= 1000 and pred["requested"]["runtime_min"] >= 1
        assert meas["peak_rss_mb"] > 0 and meas["wall_s"] > 0 and meas["samples"] >= 1
        assert meas["peak_mem_mb"] >= meas["peak_rss_mb"]
        assert "provenance" in record
    assert rules == {
        "download",
        "cache_to_shm",
        "convert_to_gguf",
        "quantize",
        "merge_lora",
        "evaluate_shard",
        "evaluate_shard_transformers",
        "evaluate_reference",
        "evaluate_reference_transformers",
        "evaluate_quality",
        "compare_finetune",
    }


def test_predicted_memory_within_25_percent_of_measured(default_run):
    """Every job in results/stats/resources.csv (the table is printed: pytest -s): each job
    recorded the prediction its resources came from next to what it measured."""
    with open(default_run / "results" / "stats" / "resources.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    print()
    print(report.resources_table(rows))
    rules = {r["rule"] for r in rows}
    assert rules >= {
        "download",
        "cache_to_shm",
        "convert_to_gguf",
        "quantize",
        "finetune",
        "merge_lora",
        "evaluate_reference",
        "evaluate_reference_transformers",
        "evaluate_quality",
        "evaluate_llama_cpp",
        "evaluate_transformers",
        "compare_finetune",
    }
    off = []
    for r in rows:
        ratio = float(r["mem_ratio"])
        assert math.isfinite(ratio), r
        if not 1 - TOLERANCE <= ratio <= 1 + TOLERANCE:
            off.append(
                f"{r['rule']} {r['model']} {r['target']}: predicted {r['predicted_as_run_mb']} "
                f"MiB, measured {r['measured_peak_mem_mb']} MiB (x{ratio})"
            )
    assert not off, "\n".join(off)
    # the fresh run wrote its RAM-disk copy in cache_to_shm: counted on both sides
    stage = next(r for r in rows if r["rule"] == "cache_to_shm")
    assert float(stage["measured_shm_mb"]) > 200 and float(stage["predicted_shm_mb"]) > 200
