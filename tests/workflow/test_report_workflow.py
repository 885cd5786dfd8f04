"""aggregate_stats on the default run: its results/stats tables, plots and `snakemake --report`."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import yaml
from helpers import NUMERIC_COLUMNS, PNG_MAGIC, REQUIRED_COLUMNS, markdown_rows, snakemake

pytestmark = pytest.mark.workflow


def expected_combinations(run: Path) -> set[tuple[str, str, str]]:
    """model x variant x backend that the run's config asks for."""
    from llmpipe.finetune.settings import tuned_models

    config = yaml.safe_load((run / "config" / "config.yaml").read_text())
    reference = config["convert"]["outtype"].upper()
    backends = config.get("evaluate", {}).get("backends", ["llama.cpp", "transformers"])
    variants = {"llama.cpp": [reference, *config["quantize"]["types"]], "transformers": ["hf"]}
    models = [*config["models"], *tuned_models(config)]  # <base>-ft: the fine-tuned ones
    return {(m, v, b) for m in models for b in backends for v in variants[b]}


def test_summary_has_one_finite_row_per_expected_combination(default_run):
    with open(default_run / "results" / "stats" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = [(r["model"], r["variant"], r["backend"]) for r in rows]
    assert len(got) == len(set(got))
    assert set(got) == expected_combinations(default_run)
    assert set(REQUIRED_COLUMNS) <= set(rows[0])
    for row in rows:
        bad = [c for c in NUMERIC_COLUMNS if not row[c] or not math.isfinite(float(row[c]))]
        assert not bad, (row["variant"], row["backend"], bad)
        assert row["device"] == "cpu" and row["git_commit"]


def test_summary_md_fills_in_the_seed_paragraph(default_run):
    md = (default_run / "results" / "stats" / "summary.md").read_text()
    assert "??" not in md
    paragraphs = re.findall(r"The expected evaluation time of the example below is .*", md)
    assert paragraphs, md[:2000]
    for text in paragraphs:
        assert "n/a" not in text, text
        assert "from the disk to the CPU's memory (device: CPU" in text
        numbers = re.findall(r"\d+\.\d+", text)
        assert len(numbers) >= 8, text
    header = markdown_rows(md, "Variant", "Size (MiB)")[0]
    assert header == ["Variant", "Size (MiB)", "BPW", "PPL", "PPL ratio", "KLD mean", "Same top %"]


def test_plots_are_real_pictures(default_run):
    plots = default_run / "results" / "stats" / "plots"
    names = {p.name for p in plots.glob("*.png")}
    assert {"quality_vs_size.png", "tokens_per_s.png", "roofline.png", "resources.png"} <= names
    for png in plots.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, png
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 300 and height > 200


def test_html_report_builds(default_run, tmp_path):
    html = tmp_path / "report.html"
    snakemake(default_run, "--report", str(html))
    text = html.read_text(errors="replace")
    assert html.stat().st_size > 50_000
    for name in ("summary.csv", "summary.md", "resources.csv", "quality_vs_size.png"):
        assert name in text, name


def test_placements_table_on_the_default_run(default_run):
    """The guide's comparison: the default model's reference GGUF on the CPU with 1 and 2
    threads and split over two hosts (two rpc-servers on 127.0.0.1, llama.cpp's RPC backend);
    the GPU placements are listed as not run, with the reason."""
    import json

    folder = default_run / "results" / "eval" / "smollm2" / "placements"
    records = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert set(records) == {"cpu-1-thread", "cpu", "2-hosts"}
    for r in records.values():
        assert r["pp_tok_s"] > 0 and r["tg_tok_s"] > 0 and r["load_s"] > 0
        assert r["gb_moved"] > 0.2 and r["provenance"]["git"]
    hosts = records["2-hosts"]
    assert hosts["where"] == "local" and len(hosts["servers"]) == 2
    assert sum(d.startswith("RPC") for d in hosts["devices"]) == 2
    assert records["cpu-1-thread"]["threads"] == 1
    page = (default_run / "results" / "stats" / "summary.md").read_text()
    section = page[page.index("## Placements") :]
    for name in records:
        assert f"| smollm2 | F16 | {name} (" in section
    assert "- `1-gpu`: needs 1 GPU(s) per host" in section
    png = default_run / "results" / "stats" / "plots" / "placements.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
