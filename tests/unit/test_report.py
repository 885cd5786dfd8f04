"""aggregate_stats: the summary table, the filled-in recipe paragraph, plots and the HTML report.

Unit tests build a small results/ tree of records by hand (the default run's results/stats and
`snakemake --report`: tests/workflow/test_report_workflow.py).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import NUMERIC_COLUMNS, PNG_MAGIC, REQUIRED_COLUMNS

from llmpipe import report
from llmpipe.errors import IntegrityError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "model_configs"


def eval_record(model: str, variant: str, backend: str, **over) -> dict:
    """An eval JSON with every key the evaluate stage writes (values made up)."""
    ratio = {"F16": 1.0, "Q8_0": 1.001, "Q4_K_M": 1.03, "hf": 1.0}[variant]
    record = {
        "model": model,
        "variant": variant,
        "backend": backend,
        "load_s": 0.4,
        "load_source": "ram_disk",
        "prompt_tokens": 120,
        "generated_tokens": 400,
        "prefill_tok_s": 900.0,
        "decode_tok_s": 120.0,
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
        "quality_reference": "F16" if backend == "llama.cpp" else "hf",
        "device": "cpu",
        "totals": {"decode_bytes": 1.0e11, "achieved_gb_s_max": 35.0, "devices": ["cpu"]},
        "settings": {"n_ctx": 2048, "kv_type": "f16"},
        "sampling": {"max_new_tokens": 100},
        "weights": {},
        "provenance": {"host": "h", "git": {"commit": "abc"}},
    }
    record.update(over)
    return record


def make_results(root: Path, variants=("F16", "Q8_0", "Q4_K_M"), hf: bool = True) -> list[Path]:
    """results/ with GGUF records, a download manifest, a config.json and eval JSONs."""
    results = root / "results"
    model = "m"
    (results / "models" / model / "hf").mkdir(parents=True)
    shutil.copy(FIXTURES / "smollm2-135m.json", results / "models" / model / "hf" / "config.json")
    (results / "models" / model / "manifest.json").write_text(
        json.dumps({"files": {"model.safetensors": {"size": 269_060_280}}, "total_bytes": 1})
    )
    sizes = {"F16": 270_885_760, "Q8_0": 144_810_880, "Q4_K_M": 105_453_952}
    (results / "gguf" / model).mkdir(parents=True)
    for v in variants:
        (results / "gguf" / model / f"{model}-{v}.json").write_text(
            json.dumps(
                {
                    "variant": v,
                    "size_bytes": sizes[v],
                    "bits_per_weight": 8 * sizes[v] / 134_515_008,
                    "n_params": 134_515_008,
                }
            )
        )
    paths = []
    (results / "eval" / model).mkdir(parents=True)
    combos = [(v, "llama.cpp") for v in variants] + ([("hf", "transformers")] if hf else [])
    for v, b in combos:
        path = results / "eval" / model / f"{v}-{b}.json"
        path.write_text(json.dumps(eval_record(model, v, b)))
        paths.append(path)
    return paths


# ---- unit ----------------------------------------------------------------------------------


def test_summary_has_one_row_per_eval_json_with_sizes(tmp_path):
    paths = make_results(tmp_path)
    rows = report.summary_rows(paths, tmp_path / "results")
    assert [(r["variant"], r["backend"]) for r in rows] == [
        ("F16", "llama.cpp"),
        ("Q8_0", "llama.cpp"),
        ("Q4_K_M", "llama.cpp"),
        ("hf", "transformers"),
    ]
    q4 = rows[2]
    assert q4["size_bytes"] == 105_453_952 and q4["bits_per_weight"] == pytest.approx(6.27, 0.01)
    hf = rows[3]  # the HF folder: size from the manifest's safetensors, bpw from the shape
    assert hf["size_bytes"] == 269_060_280 and hf["bits_per_weight"] == pytest.approx(16, 0.01)
    for r in rows:
        assert r["predicted_mem_mb"] > 0 and r["predicted_request_mem_mb"] >= 1000
    text = report.to_csv(rows, report.SUMMARY_COLUMNS)
    parsed = list(csv.DictReader(text.splitlines()))
    assert list(parsed[0])[: len(REQUIRED_COLUMNS)] == list(REQUIRED_COLUMNS)
    assert all(math.isfinite(float(row[c])) for row in parsed for c in NUMERIC_COLUMNS)


def test_missing_or_duplicate_expected_result_is_an_error(tmp_path):
    paths = make_results(tmp_path)
    with pytest.raises(IntegrityError, match="expected result is missing"):
        report.summary_rows([*paths, tmp_path / "results/eval/m/Q6_K-llama.cpp.json"])
    with pytest.raises(IntegrityError, match="also in"):
        report.summary_rows([paths[0], paths[0]], tmp_path / "results")
    paths[1].write_text("{not json")
    with pytest.raises(IntegrityError, match="unreadable"):
        report.summary_rows(paths, tmp_path / "results")


def test_eval_estimates_from_the_planner_are_used(tmp_path):
    paths = make_results(tmp_path, variants=("F16",), hf=False)
    options = {"hw": "cpu", "quant": "F16", "seq_len": 2048, "new_tokens": 100, "samples": 4}
    rows = report.summary_rows(
        paths, tmp_path / "results", {str(paths[0]): ["evaluate_llama_cpp", options]}
    )
    assert "as the shard jobs' resources" in rows[0]["_basis"]
    assert rows[0]["predicted_mem_mb"] > 256  # at least the F16 weights


def test_seed_paragraph_has_every_figure_filled_in(tmp_path):
    rows = report.summary_rows(make_results(tmp_path), tmp_path / "results")
    text = report.seed_paragraph(rows[0])
    assert "??" not in text and "n/a" not in text
    assert "4.80 seconds" in text and "400 tokens" in text and "5000.0 tokens / min" in text
    assert "0.270 GB is transferred from the disk to the CPU's memory (device: CPU" in text
    assert "120 G (float32, weights F16) operations" in text
    assert "100.00 GB at an average rate of 30.00 GB/s and a peak of 35.00 GB/s" in text


def test_markdown_quality_table_in_llama_cpp_style(tmp_path):
    rows = report.summary_rows(make_results(tmp_path), tmp_path / "results")
    md = report.markdown(rows, [], ["results/stats/plots/x.png"], {"host": "h", "git": {}})
    assert "## m" in md and "??" not in md
    header = "| Variant | Size (MiB) | BPW | PPL | PPL ratio | KLD mean | Same top % |"
    assert header in md
    assert "| Q4_K_M (llama.cpp) | 100.6 | 6.27 | 10.3000 | 1.0300 | 0.030000 | 95.00 |" in md
    # the recipe paragraph for each backend's reference run
    assert md.count("The expected evaluation time") == 2
    assert "![x](plots/x.png)" in md


def test_resource_rows_compare_as_run(tmp_path):
    rec = tmp_path / "results" / "staged" / "m" / "stage.json"
    rec.parent.mkdir(parents=True)
    rec.write_text(
        json.dumps(
            {
                "hit": True,
                "predicted": {"step": "cache_to_shm", "peak_mb": 400.0, "shm_mb": 260.0},
                "measured": {"peak_rss_mb": 130.0, "shm_mb": 0.0, "peak_mem_mb": 130.0},
            }
        )
    )
    (row,) = report.resource_rows([rec], workdir=tmp_path)
    assert row["rule"] == "cache_to_shm" and row["model"] == "m"
    assert row["predicted_as_run_mb"] == 140.0  # the copy was already there: process only
    assert row["mem_ratio"] == pytest.approx(140 / 130, abs=1e-3)


def test_plots_are_png_and_loss_plot_only_with_a_loss_csv(tmp_path):
    paths = make_results(tmp_path)
    loss = tmp_path / "results" / "finetune" / "m" / "loss.csv"
    loss.parent.mkdir(parents=True)
    loss.write_text("step,loss,eval_loss\n1,2.5,\n2,2.1,2.3\n3,1.9,\n4,1.7,1.9\n")
    out = tmp_path / "results" / "stats"
    counts = report.aggregate(
        eval_jsons=paths,
        records=[],
        out_csv=out / "summary.csv",
        out_md=out / "summary.md",
        out_resources=out / "resources.csv",
        out_plots=out / "plots",
        out_provenance=out / "provenance.json",
        loss_csvs={"m": str(loss), "other": str(tmp_path / "no" / "loss.csv")},
        results=tmp_path / "results",
    )
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == [
        "finetune_loss_m.png",
        "quality_vs_size.png",
        "resources.png",
        "roofline.png",
        "tokens_per_s.png",
    ]
    assert counts == {"rows": 4, "resources": 4, "plots": 5}
    for png in (out / "plots").iterdir():
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, png
    assert "finetune_loss_m.png" in (out / "summary.md").read_text()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["aggregate"]["host"] and len(prov["runs"]) == 4
    assert report.read_loss_csv(loss)[1]["eval_loss"] == [(2.0, 2.3), (4.0, 1.9)]
    # the fine-tune stage's long format: one series per split
    loss.write_text("step,split,loss\n1,train,2.5\n2,train,2.0\n2,heldout,2.2\n")
    assert report.read_loss_csv(loss) == (
        "step",
        {"train": [(1.0, 2.5), (2.0, 2.0)], "heldout": [(2.0, 2.2)]},
    )
