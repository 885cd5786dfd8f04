"""aggregate_stats: the summary table, the filled-in recipe paragraph, plots and resources.

The real collect/tables/plots code on a results/ tree whose records have the shape their
producers write (the model manifest is written by the producer's own function); the default
run's results/stats and `snakemake --report`: tests/workflow/test_report_workflow.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import NUMERIC_COLUMNS, PNG_MAGIC, REQUIRED_COLUMNS, markdown_rows
from safetensors.numpy import save_file

from llmpipe import manifest
from llmpipe.errors import IntegrityError
from llmpipe.report import aggregate, collect, summary, tables

BENCHMARK = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
GGUF_SIZES = {"F16": 270_885_760, "Q8_0": 144_810_880, "Q4_K_M": 105_453_952}
N_PARAMS = 134_515_008


def resources(rule: str, step: str, peak_mb: float, measured_mb: float, **pred) -> dict:
    """``predicted``/``measured`` as ``llmpipe.resources.Usage.fields`` writes them."""
    return {
        "predicted": {
            "step": step,
            "mem_mb": max(1000, int(peak_mb * 1.25)),
            "runtime_min": 2,
            "basis": "results/models/m/hf/config.json",
            "peak_mb": peak_mb,
            "shm_mb": 0.0,
            "runtime_s": 30.0,
            "gpus": 0,
            "gpu_mem_mb": 0,
            **pred,
            "rule": rule,
            "requested": {"mem_mb": max(1000, int(peak_mb * 1.25)), "runtime_min": 2, "threads": 2},
        },
        "measured": {
            "peak_rss_mb": measured_mb,
            "peak_gpu_mem_mb": None,
            "wall_s": 12.5,
            "mean_cpu_pct": 150.0,
            "shm_mb": 0.0,
            "peak_mem_mb": measured_mb,
        },
    }


def eval_record(model: str, variant: str, backend: str) -> dict:
    """An eval JSON with the keys ``evaluation.jobs.gather`` writes (values made up)."""
    ratio = {"F16": 1.0, "Q8_0": 1.001, "Q4_K_M": 1.03, "hf": 1.0}[variant]
    step = "evaluate_llama_cpp" if backend == "llama.cpp" else "evaluate_transformers"
    return {
        "model": model,
        "variant": variant,
        "backend": backend,
        "load_s": 0.4,
        "load_source": "ram_disk",
        "prompt_tokens": 120,
        "generated_tokens": 400,
        "prefill_tok_s": 900.0,
        "decode_tok_s_aggregate": 120.0,
        "decode_tok_s_per_sequence": 40.0,
        "decode_sequences": 4,
        "tokens_per_min": 5000.0,
        "wall_s": 4.8,
        "peak_rss_mb": 600.0,
        "peak_vram_mb": None,
        "gb_disk_to_device": 0.27,
        "flops": 1.2e11,
        "bytes_per_token": 2.7e8,
        "achieved_gb_s": 30.0,
        "peak_bandwidth_gb_s": 60.0,
        "roofline_pct": 50.0,
        "ppl": 10.0 * ratio,
        "ppl_ratio": ratio,
        "kld_mean": 0.0 if ratio == 1 else 0.01 * (ratio - 1) * 100,
        "kld_p99": 0.05,
        "same_top_pct": 100.0 if ratio == 1 else 95.0,
        "device": "cpu",
        "quality_reference": "F16" if backend == "llama.cpp" else "hf",
        "totals": {"decode_bytes": 1.0e11, "achieved_gb_s_max": 35.0, "devices": ["cpu"]},
        "settings": {"n_ctx": 2048, "kv_type": "f16"},
        "sampling": {"max_new_tokens": 100},
        "weights": {"total": 1, "embedding": 0, "tied": True, "read_per_step": 1},
        "provenance": {"host": "h", "git": {"commit": "abc"}},
        **resources("evaluate_shard", step, 640.0, 600.0),
    }


def write_json(path: Path, data: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def write_benchmark(path: Path, s: float = 12.8, max_rss: str = "598.21") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BENCHMARK + f"{s}\t0:00:12\t{max_rss}\t900\t590\t592\t1.0\t2.0\t90.1\t11.2\n")
    return str(path)


def make_run(root: Path, variants=("F16", "Q8_0", "Q4_K_M"), hf: bool = True) -> dict:
    """A results/ tree of one model "m" and the aggregate's inputs over it, as report.smk lists
    them: eval JSONs with their weights' records, job ids with records and benchmarks."""
    results = root / "results"
    hf_dir = results / "models" / "m" / "hf"
    hf_dir.mkdir(parents=True)
    # 64 x 1000 float16 weights + 1000 norm weights: 65,000 parameters, 2 bytes each
    save_file(
        {"w": np.zeros((64, 1000), np.float16), "norm": np.ones(1000, np.float16)},
        str(hf_dir / "model.safetensors"),
    )
    manifest.write_model_record(
        results / "models" / "m" / "manifest.json",
        model_id="m",
        origin={"kind": "package"},
        folder=hf_dir,
        files=manifest.build(hf_dir),
        seconds=1.0,
        extra=lambda record: resources("download", "download", 800.0, 790.0),
    )
    ids, records, benchmarks = [], [], []

    def job(rule: str, target: str, record: str, bench: str) -> None:
        ids.append([rule, "m", target])
        records.append(record)
        benchmarks.append(write_benchmark(root / "benchmarks" / rule / bench))

    job("download", "", str(results / "models/m/manifest.json"), "m.tsv")
    stage = {"path": "/dev/shm/m", "hit": False, "bytes": 272_629_760, "load_source": "ram_disk"}
    stage.update(resources("cache_to_shm", "cache_to_shm", 400.0, 390.0, shm_mb=260.0))
    stage["measured"]["shm_mb"] = 260.0
    job("cache_to_shm", "", write_json(results / "staged/m/stage.json", stage), "m.tsv")
    for v in variants:
        rule = "convert_to_gguf" if v == "F16" else "quantize"
        gguf = {
            "variant": v,
            "gguf": f"results/gguf/m/m-{v}.gguf",
            "n_params": N_PARAMS,
            "size_bytes": GGUF_SIZES[v],
            "bits_per_weight": round(8 * GGUF_SIZES[v] / N_PARAMS, 4),
            **resources(rule, rule, 700.0, 650.0),
        }
        job(rule, v, write_json(results / f"gguf/m/m-{v}.json", gguf), f"m-{v}.tsv")
    combos = [(v, "llama.cpp") for v in variants] + ([("hf", "transformers")] if hf else [])
    for backend in dict.fromkeys(b for _, b in combos):
        ref = "F16" if backend == "llama.cpp" else "hf"
        rec = {"model": "m", "variant": ref, "backend": backend}
        rec |= resources("evaluate_reference", "evaluate_llama_cpp", 500.0, 480.0)
        path = write_json(results / f"eval/m/reference-{backend}.json", rec)
        job("evaluate_reference", f"{ref}-{backend}", path, f"m-{backend}.tsv")
    evals, weights = [], []
    for v, b in combos:
        evals.append(write_json(results / f"eval/m/{v}-{b}.json", eval_record("m", v, b)))
        weights.append(
            str(results / (f"gguf/m/m-{v}.json" if b == "llama.cpp" else "models/m/manifest.json"))
        )
    return {
        "eval_jsons": evals,
        "weights": weights,
        "jobs": ids,
        "records": records,
        "benchmarks": benchmarks,
    }


def summary_of(run: dict):
    return tables.summary_frame(collect.read_evaluations(run["eval_jsons"], run["weights"]))


# ---- unit ----------------------------------------------------------------------------------


def test_the_model_manifest_records_its_weights_from_the_safetensors_headers(tmp_path):
    make_run(tmp_path)
    record = json.loads((tmp_path / "results/models/m/manifest.json").read_text())
    size = (tmp_path / "results/models/m/hf/model.safetensors").stat().st_size
    assert record["weights"] == {
        "size_bytes": size,
        "n_params": 65_000,
        "bits_per_weight": round(8 * size / 65_000, 4),
    }


def test_summary_has_one_row_per_eval_json_with_the_weights_of_its_record(tmp_path):
    run = make_run(tmp_path)
    table = summary_of(run)
    assert list(zip(table["variant"], table["backend"], strict=True)) == [
        ("F16", "llama.cpp"),
        ("Q8_0", "llama.cpp"),
        ("Q4_K_M", "llama.cpp"),
        ("hf", "transformers"),
    ]
    q4, hf = tables.records(table)[2], tables.records(table)[3]
    assert q4["size_bytes"] == 105_453_952 and q4["bits_per_weight"] == pytest.approx(6.27, 0.01)
    assert hf["n_params"] == 65_000 and hf["bits_per_weight"] == pytest.approx(16, 0.01)
    # the prediction is the one the job recorded: its raw peak and its request
    assert set(table["predicted_mem_mb"]) == {640.0} and set(table["predicted_request_mem_mb"]) == {
        1000
    }
    out = tmp_path / "summary.csv"
    tables.write_csv(table, tables.SUMMARY_COLUMNS, out)
    parsed = list(csv.DictReader(out.read_text().splitlines()))
    assert list(parsed[0]) == list(tables.SUMMARY_COLUMNS)
    assert list(parsed[0])[: len(REQUIRED_COLUMNS)] == list(REQUIRED_COLUMNS)
    assert all(math.isfinite(float(row[c])) for row in parsed for c in NUMERIC_COLUMNS)
    # one type per column: integers as integers, other numbers with 6 significant digits
    assert parsed[2]["size_bytes"] == "105453952" and parsed[2]["flops"] == "1.2e+11"
    assert parsed[0]["peak_vram_mb"] == "" and parsed[0]["eval_json"] == run["eval_jsons"][0]


def test_a_missing_corrupt_or_inconsistent_record_is_one_error_naming_the_file(tmp_path):
    run = make_run(tmp_path)
    evals, weights = run["eval_jsons"], run["weights"]
    missing = str(tmp_path / "results/eval/m/Q6_K-llama.cpp.json")
    with pytest.raises(IntegrityError, match=f"{re.escape(missing)}: expected result is missing"):
        collect.read_evaluations([*evals, missing], [*weights, weights[0]])
    with pytest.raises(IntegrityError, match="also in"):
        collect.read_evaluations([evals[0], evals[0]], [weights[0], weights[0]])
    with pytest.raises(IntegrityError, match=r"m-F16.json: variant is 'F16', expected 'Q8_0'"):
        collect.read_evaluations([evals[1]], [weights[0]])
    with pytest.raises(IntegrityError, match="weight records"):
        collect.read_evaluations(evals, weights[:-1])
    Path(evals[1]).write_text("{not json")
    with pytest.raises(IntegrityError, match=f"{re.escape(evals[1])}: unreadable"):
        collect.read_evaluations(evals, weights)
    # a job's record: written by the rule it is listed for, with its resources
    ids, records, benchmarks = run["jobs"], run["records"], run["benchmarks"]
    with pytest.raises(IntegrityError, match="rule is 'download', expected 'quantize'"):
        collect.read_jobs([["quantize", "m", "Q8_0"]], records[:1], benchmarks[:1])
    stage = json.loads(Path(records[1]).read_text())
    del stage["measured"]
    Path(records[1]).write_text(json.dumps(stage))
    with pytest.raises(IntegrityError, match=r"stage.json: no 'measured' in the record"):
        collect.read_jobs(ids, records, benchmarks)
    Path(benchmarks[0]).write_text("not\ta benchmark\n")
    with pytest.raises(IntegrityError, match=f"{re.escape(benchmarks[0])}: expected a Snakemake"):
        collect.read_jobs(ids[:1], records[:1], benchmarks[:1])


def test_seed_paragraph_has_every_figure_filled_in(tmp_path):
    row = tables.records(summary_of(make_run(tmp_path)))[0]
    text = summary.seed_paragraph(row)
    assert "??" not in text and "n/a" not in text
    assert "4.80 seconds" in text and "400 tokens" in text and "5000.0 tokens / min" in text
    assert "0.270 GB is transferred from the disk to the CPU's memory (device: CPU" in text
    assert "120 G (float32, weights F16) operations" in text
    assert "100.00 GB at an average rate of 30.00 GB/s and a peak of 35.00 GB/s" in text


def test_markdown_tables_in_llama_cpp_style(tmp_path):
    run = make_run(tmp_path)
    table = summary_of(run)
    jobs = tables.resource_frame(
        collect.read_jobs(run["jobs"], run["records"], run["benchmarks"]), table
    )
    md = summary.markdown(table, jobs, ["results/stats/plots/x.png"], {"host": "h", "git": {}})
    assert "## m" in md and "??" not in md
    quality = markdown_rows(md, "Variant", "Size (MiB)")
    assert quality[0] == [
        "Variant",
        "Size (MiB)",
        "BPW",
        "PPL",
        "PPL ratio",
        "KLD mean",
        "Same top %",
    ]
    assert quality[1][0].startswith(":") and quality[1][1].endswith(":")  # left, then right
    assert [
        "Q4_K_M (llama.cpp)",
        "100.6",
        "6.27",
        "10.3000",
        "1.0300",
        "0.030000",
        "95.00",
    ] in quality
    # the recipe paragraph for each backend's reference run
    assert md.count("The expected evaluation time") == 2
    assert "![x](plots/x.png)" in md
    resources_md = markdown_rows(md, "Rule")
    assert ["cache_to_shm", "-", "400", "390", "1.03", "1000", "1000", "30", "12.5"] in resources_md


def test_resource_rows_come_from_the_job_records_and_benchmarks(tmp_path):
    run = make_run(tmp_path)
    jobs = collect.read_jobs(run["jobs"], run["records"], run["benchmarks"])
    rows = tables.records(tables.resource_frame(jobs, summary_of(run)))
    assert [(r["rule"], r["target"]) for r in rows] == [
        ("download", ""),
        ("cache_to_shm", ""),
        ("convert_to_gguf", "F16"),
        ("quantize", "Q8_0"),
        ("quantize", "Q4_K_M"),
        ("evaluate_reference", "F16-llama.cpp"),
        ("evaluate_reference", "hf-transformers"),
        ("evaluate_llama_cpp", "F16-llama.cpp"),
        ("evaluate_llama_cpp", "Q8_0-llama.cpp"),
        ("evaluate_llama_cpp", "Q4_K_M-llama.cpp"),
        ("evaluate_transformers", "hf-transformers"),
    ]
    stage = rows[1]
    assert stage["predicted_as_run_mb"] == 400.0  # the job wrote the RAM-disk copy
    assert stage["mem_ratio"] == pytest.approx(400 / 390, abs=1e-3)
    assert stage["benchmark_max_rss_mb"] == 598.21 and stage["benchmark_s"] == 12.8
    assert rows[-1]["basis"] == "the job's own prediction" and rows[-1]["benchmark_s"] is None
    # a staged copy that was already there costs the job nothing: process memory only
    hit = {"predicted": {"peak_mb": 400.0, "shm_mb": 260.0}, "measured": {"shm_mb": 0.0}}
    assert tables.as_run_mb(hit["predicted"], hit["measured"]) == 140.0


def test_resources_table_reads_resources_csv_rows(tmp_path):
    run = make_run(tmp_path)
    jobs = collect.read_jobs(run["jobs"], run["records"], run["benchmarks"])
    out = tmp_path / "resources.csv"
    tables.write_csv(tables.resource_frame(jobs, summary_of(run)), tables.RESOURCE_COLUMNS, out)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    md = tables.resources_table(rows)
    assert markdown_rows(md, "Rule")[2] == [
        "download", "-", "800", "790", "1.01", "1000", "1000", "30", "12.5",
    ]  # fmt: skip


def test_aggregate_writes_every_output_and_a_loss_plot_per_tuned_model(tmp_path):
    run = make_run(tmp_path)
    loss = tmp_path / "results" / "finetune" / "m" / "loss.csv"
    loss.parent.mkdir(parents=True)
    loss.write_text("step,loss,eval_loss\n1,2.5,\n2,2.1,2.3\n3,1.9,\n4,1.7,1.9\n")
    out = tmp_path / "results" / "stats"
    counts = aggregate(
        **run,
        losses={"m": str(loss)},
        out_csv=out / "summary.csv",
        out_md=out / "summary.md",
        out_resources=out / "resources.csv",
        out_plots=out / "plots",
        out_provenance=out / "provenance.json",
        gguf_notes={"other": "not converted: no llama.cpp architecture"},
    )
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == [
        "finetune_loss_m.png",
        "quality_vs_size.png",
        "resources.png",
        "roofline.png",
        "tokens_per_s.png",
    ]
    assert counts == {
        "rows": 4, "resources": 11, "task_rows": 0, "placements": 0, "plots": 5
    }  # fmt: skip
    for png in (out / "plots").iterdir():
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, png
    md = (out / "summary.md").read_text()
    assert "finetune_loss_m.png" in md
    assert "## other\n\nGGUF (llama.cpp): not converted: no llama.cpp architecture." in md
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["aggregate"]["host"] and len(prov["runs"]) == 4
    assert prov["inputs"]["records"] == run["records"]


def test_loss_curves_in_wide_and_long_format(tmp_path):
    loss = tmp_path / "loss.csv"
    loss.write_text("step,loss,eval_loss\n1,2.5,\n2,2.1,2.3\n3,1.9,\n4,1.7,1.9\n")
    assert collect.read_loss_csv(loss)[1]["eval_loss"] == [(2.0, 2.3), (4.0, 1.9)]
    # the fine-tune stage's long format: one series per split
    loss.write_text("step,split,loss\n1,train,2.5\n2,train,2.0\n2,heldout,2.2\n")
    assert collect.read_loss_csv(loss) == (
        "step",
        {"train": [(1.0, 2.5), (2.0, 2.0)], "heldout": [(2.0, 2.2)]},
    )
