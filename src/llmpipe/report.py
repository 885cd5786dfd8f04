"""aggregate_stats: every result of a run in one table, one page and a few pictures.

- ``results/stats/summary.csv``   one row per model x variant x backend (each eval JSON the
  workflow expected), with the GGUF's size and bits per weight, speed, quality, memory
  (measured and predicted) and the seed's hardware figures.
- ``results/stats/summary.md``    per model: the seed's "??" paragraph filled in with measured
  numbers (for every backend's reference run, then a table of the same figures for every
  variant), the quality table in the style of llama.cpp's perplexity README, speed, and the
  resources the jobs were predicted to need next to what they used.
- ``results/stats/resources.csv`` one row per job that recorded resources: the estimator's
  prediction (raw and with margins), the request, and the measured peaks.
- ``results/stats/plots/*.png``   quality loss vs size, tokens/s per variant, roofline %,
  predicted vs measured memory, and the fine-tune loss curve of each model that has one.
- ``results/stats/provenance.json`` where and with what the numbers were made.

Inputs are records (JSON) the other rules wrote; a missing optional piece (no fine-tune) leaves
its plot out, but an expected eval JSON that cannot be read is an error: no row is ever dropped.
Heavy imports (matplotlib) stay inside the plotting functions.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmpipe import atomic, provenance
from llmpipe import resources as res
from llmpipe.errors import IntegrityError

MIB = 2**20

# summary.csv: the columns first, then context.
SUMMARY_COLUMNS = (
    "model",
    "variant",
    "backend",
    "size_bytes",
    "bits_per_weight",
    "load_s",
    "prefill_tok_s",
    "decode_tok_s",
    "tokens_per_min",
    "wall_s",
    "ppl",
    "ppl_ratio",
    "kld_mean",
    "same_top_pct",
    "peak_rss_mb",
    "peak_vram_mb",
    "predicted_mem_mb",
    "gb_disk_to_device",
    "flops",
    "achieved_gb_s",
    "roofline_pct",
    # context
    "device",
    "load_source",
    "prompt_tokens",
    "generated_tokens",
    "kld_p99",
    "bytes_per_token",
    "peak_bandwidth_gb_s",
    "achieved_gb_s_max",
    "decode_gb",
    "n_params",
    "predicted_request_mem_mb",
    "host",
    "git_commit",
    "eval_json",
)

RESOURCE_COLUMNS = (
    "rule",
    "model",
    "target",
    "basis",
    "predicted_peak_mb",
    "predicted_shm_mb",
    "predicted_as_run_mb",
    "predicted_mem_mb",
    "requested_mem_mb",
    "measured_peak_rss_mb",
    "measured_shm_mb",
    "measured_peak_mem_mb",
    "mem_ratio",
    "predicted_gpu_mem_mb",
    "measured_gpu_mem_mb",
    "predicted_runtime_s",
    "predicted_runtime_min",
    "requested_runtime_min",
    "measured_wall_s",
    "mean_cpu_pct",
    "benchmark_max_rss_mb",
    "benchmark_s",
    "record",
)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON record that must exist and parse (an expected result is never skipped)."""
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


def _optional(path: Path) -> dict[str, Any] | None:
    return res.read_json(path) if path.is_file() else None


def _num(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _eval_identity(path: Path, record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(model, variant, backend) from the record, else from results/eval/{model}/{v}-{b}.json."""
    model = record.get("model") or path.parent.name
    variant, backend = record.get("variant"), record.get("backend")
    if not (variant and backend):
        stem_variant, _, stem_backend = path.stem.rpartition("-")
        variant = variant or stem_variant
        backend = backend or stem_backend
    return str(model), str(variant), str(backend)


def _weights_of_variant(root: Path, model: str, variant: str) -> dict[str, Any]:
    """Size on disk, bits per weight and parameter count of what was evaluated: the GGUF
    record of the variant; for the HF folder its safetensors (download or merge manifest) and
    the parameter count of its config.json."""
    gguf = _optional(root / "gguf" / model / f"{model}-{variant}.json")
    if gguf:
        return {
            "size_bytes": gguf.get("size_bytes"),
            "bits_per_weight": gguf.get("bits_per_weight"),
            "n_params": gguf.get("n_params"),
        }
    manifest = _optional(root / "models" / model / "manifest.json") or {}
    files = manifest.get("files") or {}
    size = sum(f["size"] for name, f in files.items() if name.endswith(".safetensors"))
    shape = res.model_shape(res.model_config(model, root=root.parent))
    n_params = shape.n_params if shape else None
    bpw = round(8 * size / n_params, 4) if size and n_params else None
    return {"size_bytes": size or None, "bits_per_weight": bpw, "n_params": n_params}


def _eval_step(backend: str) -> str:
    return "evaluate_llama_cpp" if backend == "llama.cpp" else "evaluate_transformers"


def _prompt_count(path: Path, record: Mapping[str, Any]) -> int | None:
    """Prompts of an eval run: its own list, else the lines of the texts file beside it."""
    if record.get("prompts"):
        return len(record["prompts"])
    texts = record.get("texts")
    if texts and (path.parent / texts).is_file():
        lines = (path.parent / texts).read_text().splitlines()
        return sum(1 for line in lines if line.strip()) or None
    return None


def eval_prediction(
    root: Path, model: str, variant: str, record: Mapping[str, Any], path: Path
) -> res.Plan:
    """The estimator's prediction for an evaluation run, from the model's config.json and the
    run's own settings (prompts, tokens, context, KV type, batch, dtype, device)."""
    backend = record.get("backend", "llama.cpp")
    device = str(record.get("device") or "cpu")
    hw = "cpu" if device == "cpu" else "gpu"
    settings = record.get("settings") or {}
    sampling = record.get("sampling") or {}
    n_prompts = _prompt_count(path, record)
    options: dict[str, Any] = {"hw": hw}
    prompt_tokens = _num(record.get("prompt_tokens"))
    if sampling.get("max_new_tokens"):
        options["new_tokens"] = int(sampling["max_new_tokens"])
    if n_prompts:
        options["samples"] = n_prompts
    if prompt_tokens and n_prompts:
        options["seq_len"] = max(1, round(prompt_tokens / n_prompts))
    if backend == "llama.cpp":
        options["quant"] = variant
        if settings.get("kv_type"):
            options["kv_type"] = settings["kv_type"]
        if settings.get("n_ctx"):  # llama.cpp allocates the KV cache for its whole context
            options["seq_len"] = max(1, int(settings["n_ctx"]) - options.get("new_tokens", 128))
    else:
        dtype = settings.get("resolved_dtype") or ("float32" if hw == "cpu" else "float16")
        options["dtype"] = dtype
        options["batch"] = int(settings.get("batch_size") or 1)
    config_json = res.model_config(model, root=root.parent)
    try:
        return res.plan(_eval_step(backend), config_json, **options)
    except Exception:  # noqa: BLE001 - a missing prediction leaves an empty cell
        return res.Plan(_eval_step(backend), 0, 0, basis="none")


def summary_rows(
    eval_paths: Sequence[str | os.PathLike],
    root: str | os.PathLike = "results",
    eval_estimates: Mapping[str, Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per eval JSON, in the given order (the order the workflow expects them in).

    ``eval_estimates``: {eval JSON: (estimator step, options)} as the evaluation jobs' resources
    were planned; without an entry the prediction is made from the run's own settings.
    """
    root = Path(root)
    eval_estimates = eval_estimates or {}
    rows = []
    seen: dict[tuple[str, str, str], str] = {}
    for raw in eval_paths:
        path = Path(raw)
        record = read_record(path)
        model, variant, backend = _eval_identity(path, record)
        key = (model, variant, backend)
        if key in seen:
            raise IntegrityError(f"{path}: {model} {variant} {backend} also in {seen[key]}")
        seen[key] = str(path)
        predicted = record.get("predicted")
        basis = "the job's own prediction"
        if isinstance(predicted, Mapping) and predicted.get("peak_mb") is not None:
            pred_peak, pred_request = predicted.get("peak_mb"), predicted.get("mem_mb")
            if predicted.get("gpus"):  # on a GPU the number to compare is VRAM: peak per GPU
                pred_peak = predicted.get("gpu_mem_mb")
        else:
            planned = eval_estimates.get(str(raw)) or eval_estimates.get(str(path))
            if planned:
                step, options = planned
                config_json = res.model_config(model, root=root.parent)
                plan = res.plan(step, config_json, **dict(options))
                basis = f"{plan.basis}, as the shard jobs' resources"
            else:
                plan = eval_prediction(root, model, variant, record, path)
                basis = f"{plan.basis}, from the run's settings"
            pred_peak, pred_request = plan.peak_mb, plan.mem_mb or None
            if plan.gpus:  # on a GPU the number to compare is VRAM: peak per GPU
                pred_peak = plan.gpu_mem_mb
        totals = record.get("totals") or {}
        prov = record.get("provenance") or {}
        decode_bytes = _num(totals.get("decode_bytes"))
        row = {
            **_weights_of_variant(root, model, variant),
            **{k: record.get(k) for k in SUMMARY_COLUMNS if k in record},
            "model": model,
            "variant": variant,
            "backend": backend,
            "predicted_mem_mb": pred_peak,
            "predicted_request_mem_mb": pred_request,
            "device": record.get("device") or ",".join(totals.get("devices") or []) or None,
            "achieved_gb_s_max": totals.get("achieved_gb_s_max"),
            "decode_gb": round(decode_bytes / 1e9, 6) if decode_bytes is not None else None,
            "host": prov.get("host"),
            "git_commit": (prov.get("git") or {}).get("commit"),
            "eval_json": str(path),
            "_record": record,
            "_basis": basis,
        }
        rows.append(row)
    return rows


def _model_of_record(path: Path, record: Mapping[str, Any]) -> str:
    if record.get("model"):
        return str(record["model"])
    parts = path.parts
    return parts[-2] if len(parts) >= 2 else ""


def _benchmark(workdir: Path, rule: str, model: str, target: str) -> dict[str, float | None]:
    """Snakemake's own benchmark of the job (max_rss, s), where the file is there."""
    name = f"{model}-{target}" if target else model
    if rule == "evaluate_reference":  # one per model and backend: {model}-{backend}.tsv
        name = f"{model}-{target.rpartition('-')[2]}"
    path = workdir / "benchmarks" / rule / f"{name}.tsv"
    try:
        lines = path.read_text().splitlines()
        head, last = lines[0].split("\t"), lines[-1].split("\t")
        values = dict(zip(head, last, strict=False))
        return {
            "benchmark_max_rss_mb": _num(values.get("max_rss")),
            "benchmark_s": _num(values.get("s")),
        }
    except (OSError, IndexError):
        return {"benchmark_max_rss_mb": None, "benchmark_s": None}


def _target(rule: str, path: Path, record: Mapping[str, Any], model: str) -> str:
    """The variant a GGUF job made or a perplexity job scored (with its backend); empty for
    per-model jobs (download, staging, fine-tuning)."""
    if rule in ("evaluate_reference", "evaluate_quality"):
        return f"{record.get('variant')}-{record.get('backend')}"
    if rule not in ("convert_to_gguf", "quantize"):
        return ""
    if record.get("variant"):
        return str(record["variant"])
    return path.stem.removeprefix(f"{model}-")


def resource_rows(
    record_paths: Iterable[str | os.PathLike],
    summary: Sequence[Mapping[str, Any]] = (),
    workdir: str | os.PathLike = ".",
) -> list[dict[str, Any]]:
    """One row per job record with ``predicted``/``measured`` (foundation rules, and any other
    rule that records them), then one per evaluation from the summary rows."""
    workdir = Path(workdir)
    rows = []
    for raw in record_paths:
        path = Path(raw)
        record = read_record(path)
        pred, meas = record.get("predicted"), record.get("measured")
        if not isinstance(pred, Mapping) or not isinstance(meas, Mapping):
            continue
        rule = str(pred.get("rule") or pred.get("step") or path.parent.parent.name)
        model = _model_of_record(path, record)
        target = _target(rule, path, record, model)
        requested = pred.get("requested") or {}
        rows.append(
            {
                "rule": rule,
                "model": model,
                "target": target,
                "basis": pred.get("basis"),
                "predicted_peak_mb": pred.get("peak_mb"),
                "predicted_shm_mb": pred.get("shm_mb"),
                "predicted_as_run_mb": as_run_mb(pred, meas),
                "predicted_mem_mb": pred.get("mem_mb"),
                "requested_mem_mb": requested.get("mem_mb"),
                "measured_peak_rss_mb": meas.get("peak_rss_mb"),
                "measured_shm_mb": meas.get("shm_mb"),
                "measured_peak_mem_mb": meas.get("peak_mem_mb"),
                "mem_ratio": res.ratio(as_run_mb(pred, meas), meas.get("peak_mem_mb")),
                "predicted_gpu_mem_mb": pred.get("gpu_mem_mb") or None,
                "measured_gpu_mem_mb": meas.get("peak_gpu_mem_mb"),
                "predicted_runtime_s": pred.get("runtime_s"),
                "predicted_runtime_min": pred.get("runtime_min"),
                "requested_runtime_min": requested.get("runtime_min"),
                "measured_wall_s": meas.get("wall_s"),
                "mean_cpu_pct": meas.get("mean_cpu_pct"),
                **_benchmark(workdir, rule, model, target),
                "record": str(path),
            }
        )
    for row in summary:
        record = row.get("_record") or {}
        step = _eval_step(row["backend"])
        on_gpu = row.get("peak_vram_mb") not in (None, 0)
        measured = row.get("peak_vram_mb") if on_gpu else row.get("peak_rss_mb")
        rows.append(
            {
                "rule": step,
                "model": row["model"],
                "target": f"{row['variant']}-{row['backend']}",
                "basis": row.get("_basis"),
                "predicted_peak_mb": row.get("predicted_mem_mb"),
                "predicted_shm_mb": None,
                "predicted_as_run_mb": row.get("predicted_mem_mb"),
                "predicted_mem_mb": row.get("predicted_request_mem_mb"),
                "requested_mem_mb": None,
                "measured_peak_rss_mb": row.get("peak_rss_mb"),
                "measured_shm_mb": None,
                "measured_peak_mem_mb": measured,
                "mem_ratio": res.ratio(row.get("predicted_mem_mb"), measured),
                "predicted_gpu_mem_mb": None,
                "measured_gpu_mem_mb": row.get("peak_vram_mb"),
                "predicted_runtime_s": None,
                "predicted_runtime_min": None,
                "requested_runtime_min": None,
                "measured_wall_s": row.get("wall_s"),
                "mean_cpu_pct": None,
                "benchmark_max_rss_mb": None,
                "benchmark_s": None,
                "record": row.get("eval_json") or record.get("eval_json"),
            }
        )
    return rows


def as_run_mb(predicted: Mapping[str, Any], measured: Mapping[str, Any]) -> float | None:
    """The prediction for the job as it ran: the RAM-disk bytes count only when the job wrote
    them (a staged copy that was already there costs this job nothing)."""
    peak = _num(predicted.get("peak_mb"))
    if peak is None:
        return None
    shm = _num(predicted.get("shm_mb")) or 0.0
    wrote = (_num(measured.get("shm_mb")) or 0.0) > 0
    return round(peak if wrote else peak - shm, 1)


# --------------------------------------------------------------------------------------------
# Writing: CSV and Markdown
# --------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return str(value)


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _fmt(value: Any, spec: str = ".2f", missing: str = "n/a") -> str:
    num = _num(value)
    return missing if num is None else format(num, spec)


def _si(value: Any, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 1.23e12 -> '1.23 T'."""
    num = _num(value)
    if num is None:
        return "n/a"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(num) >= factor:
            return f"{num / factor:.3g} {prefix}{unit}"
    return f"{num:.3g} {unit}".rstrip()


def _device_words(device: str | None) -> tuple[str, str]:
    """(what the weights go to, what the memory traffic is) for the seed's sentences."""
    if not device or device == "cpu":
        return "the CPU's memory (device: CPU, no GPU)", "from main memory to the CPU"
    return f"the GPU ({device})", f"from VRAM to the GPU ({device})"


def compute_dtype(row: Mapping[str, Any]) -> str:
    """What the operations were done in, for the seed's "(float??)"."""
    record = row.get("_record") or {}
    settings = record.get("settings") or {}
    if row.get("backend") == "transformers":
        return str(settings.get("resolved_dtype") or settings.get("dtype") or "float32")
    device = row.get("device") or "cpu"
    # ggml computes quantized matmuls as int8/f32 dot products on the CPU, f16 on CUDA.
    acc = "float32" if device == "cpu" else "float16"
    return f"{acc}, weights {row.get('variant')}"


def seed_paragraph(row: Mapping[str, Any]) -> str:
    """The seed's recipe paragraph with every "??" replaced by this run's measured figures."""
    to_device, traffic = _device_words(row.get("device"))
    peak_rate = row.get("achieved_gb_s_max")
    hw_peak = row.get("peak_bandwidth_gb_s")
    return (
        f"The expected evaluation time of the example below is {_fmt(row.get('wall_s'))} "
        f"seconds. This example produces {_fmt(row.get('generated_tokens'), '.0f')} tokens at an "
        f"average rate of {_fmt(row.get('tokens_per_min'), '.1f')} tokens / min. During this "
        f"test a total of {_fmt(row.get('gb_disk_to_device'), '.3f')} GB is transferred from the "
        f"disk to {to_device} and a total of {_si(row.get('flops'))} ({compute_dtype(row)}) "
        f"operations are done. The total memory transfer {traffic} is "
        f"{_fmt(row.get('decode_gb'), '.2f')} GB at an average rate of "
        f"{_fmt(row.get('achieved_gb_s'))} GB/s and a peak of {_fmt(peak_rate)} GB/s "
        f"(the device's measured peak bandwidth is {_fmt(hw_peak, '.1f')} GB/s: "
        f"{_fmt(row.get('roofline_pct'), '.1f')} % of the roofline)."
    )


def _md_table(header: Sequence[str], body: Iterable[Sequence[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = [":--" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def quality_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """llama.cpp perplexity README style: one line per variant, reference first."""
    body = []
    for r in rows:
        size = _num(r.get("size_bytes"))
        body.append(
            [
                f"{r['variant']} ({r['backend']})",
                _fmt(size / MIB if size else None, ".1f"),
                _fmt(r.get("bits_per_weight"), ".2f"),
                _fmt(r.get("ppl"), ".4f"),
                _fmt(r.get("ppl_ratio"), ".4f"),
                _fmt(r.get("kld_mean"), ".6f"),
                _fmt(r.get("same_top_pct"), ".2f"),
            ]
        )
    header = ["Variant", "Size (MiB)", "BPW", "PPL", "PPL ratio", "KLD mean", "Same top %"]
    return _md_table(header, body)


def speed_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = [
        [
            f"{r['variant']} ({r['backend']})",
            str(r.get("device") or "n/a"),
            _fmt(r.get("load_s")),
            str(r.get("load_source") or "n/a"),
            _fmt(r.get("prefill_tok_s"), ".1f"),
            _fmt(r.get("decode_tok_s"), ".1f"),
            _fmt(r.get("tokens_per_min"), ".0f"),
            _fmt(r.get("achieved_gb_s")),
            _fmt(r.get("roofline_pct"), ".1f"),
            _fmt(r.get("peak_rss_mb"), ".0f"),
            _fmt(r.get("peak_vram_mb"), ".0f", missing="-"),
            _fmt(r.get("predicted_mem_mb"), ".0f"),
        ]
        for r in rows
    ]
    header = [
        "Variant",
        "Device",
        "Load s",
        "Loaded from",
        "Prefill tok/s",
        "Decode tok/s",
        "Tokens/min",
        "GB/s",
        "Roofline %",
        "Peak RSS MiB",
        "Peak VRAM MiB",
        "Predicted MiB",
    ]
    return _md_table(header, body, "llrl" + "r" * 8)


def figures_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The seed's figures for every variant (the paragraph's numbers as columns)."""
    body = [
        [
            f"{r['variant']} ({r['backend']})",
            _fmt(r.get("wall_s")),
            _fmt(r.get("generated_tokens"), ".0f"),
            _fmt(r.get("tokens_per_min"), ".1f"),
            _fmt(r.get("gb_disk_to_device"), ".3f"),
            _si(r.get("flops")),
            _fmt(r.get("decode_gb"), ".2f"),
            _fmt(r.get("achieved_gb_s")),
            _fmt(r.get("achieved_gb_s_max")),
        ]
        for r in rows
    ]
    header = [
        "Variant",
        "Eval time s",
        "Tokens",
        "Tokens/min",
        "GB disk to device",
        "Operations",
        "Memory traffic GB",
        "Avg GB/s",
        "Peak GB/s",
    ]
    return _md_table(header, body)


def resources_table(rows: Sequence[Mapping[str, Any]]) -> str:
    multi = len({r.get("model") for r in rows}) > 1
    body = [
        [
            r["rule"],
            " ".join(filter(None, [r.get("model") if multi else "", r.get("target")])) or "-",
            _fmt(r.get("predicted_as_run_mb"), ".0f"),
            _fmt(r.get("measured_peak_mem_mb"), ".0f"),
            _fmt(r.get("mem_ratio"), ".2f"),
            _fmt(r.get("predicted_mem_mb"), ".0f", missing="-"),
            _fmt(r.get("requested_mem_mb"), ".0f", missing="-"),
            _fmt(r.get("predicted_runtime_s"), ".0f", missing="-"),
            _fmt(r.get("measured_wall_s"), ".1f"),
        ]
        for r in rows
    ]
    header = [
        "Rule",
        "Target",
        "Predicted peak MiB",
        "Measured peak MiB",
        "Ratio",
        "With margin MiB",
        "Requested MiB",
        "Predicted s",
        "Measured s",
    ]
    return _md_table(header, body, "ll" + "r" * 7)


def markdown(
    summary: Sequence[Mapping[str, Any]],
    resources: Sequence[Mapping[str, Any]],
    plots: Sequence[str],
    prov: Mapping[str, Any],
    finetune: Mapping[str, str] | None = None,
    gguf_notes: Mapping[str, str] | None = None,
) -> str:
    """summary.md; ``gguf_notes``: {model: why its GGUF steps were not run (or were forced)}."""
    gguf_notes = gguf_notes or {}
    models = list(dict.fromkeys(r["model"] for r in summary))
    models += [m for m in dict.fromkeys(r["model"] for r in resources) if m not in models]
    models += [m for m in gguf_notes if m not in models]
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
        rows = [r for r in summary if r["model"] == model]
        out += [f"## {model}", ""]
        if model in gguf_notes:
            out += [f"GGUF (llama.cpp): {gguf_notes[model]}.", ""]
        references = [r for r in rows if _is_reference(r)]
        if rows:
            out += ["### The recipe's figures", ""]
            for r in references or rows[:1]:
                out += [f"**{r['variant']}, {r['backend']}** — {seed_paragraph(r)}", ""]
            out += [figures_table(rows), "", "### Quality", "", quality_table(rows), ""]
            out += ["### Speed and memory", "", speed_table(rows), ""]
        rrows = [r for r in resources if r["model"] == model]
        if rrows:
            out += ["### Resources: predicted vs measured", "", resources_table(rrows), ""]
        if finetune and model in finetune:
            out += [f"Fine-tune loss curve: `{finetune[model]}`.", ""]
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
        "",
    ]
    return "\n".join(out)


def _is_reference(row: Mapping[str, Any]) -> bool:
    """The run the others' quality is measured against (its PPL ratio is 1 by definition)."""
    ref = (row.get("_record") or {}).get("quality_reference")
    return ref == row["variant"] if ref else _num(row.get("ppl_ratio")) == 1.0


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return str(path)


def _plain_log_ticks(ax) -> None:
    """Log axis labelled 20, 50, 100 rather than 2 x 10^1."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes)


def plot_quality_vs_size(rows, path: Path) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "ppl_ratio", "PPL ratio (variant / reference)"),
        (axes[1], "kld_mean", "KL-divergence, mean (nats)"),
    ):
        drawn = False
        n_label = 0
        for model, backend in dict.fromkeys((r["model"], r["backend"]) for r in rows):
            pts = [
                (r["size_bytes"] / MIB, _num(r.get(key)), r["variant"])
                for r in rows
                if (r["model"], r["backend"]) == (model, backend)
                and _num(r.get("size_bytes"))
                and _num(r.get(key)) is not None
            ]
            if not pts:
                continue
            pts.sort()
            marker = "o-" if backend == "llama.cpp" else "s--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"{model} {backend}")
            for x, y, name in pts:
                offset = (4, 4) if n_label % 2 == 0 else (4, -11)  # neighbours do not overlap
                ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
                n_label += 1
            drawn = True
        if not drawn:
            _no_data(ax, key)
        ax.set_xlabel("model size (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.suptitle("Quality loss vs size")
    return _save(fig, path)


def _bar_labels(rows) -> list[str]:
    multi = len({r["model"] for r in rows}) > 1
    return [(f"{r['model']}\n" if multi else "") + f"{r['variant']}\n{r['backend']}" for r in rows]


def plot_tokens_per_s(rows, path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.2))
    xs = list(range(len(rows)))
    width = 0.4
    prefill = [_num(r.get("prefill_tok_s")) or 0 for r in rows]
    decode = [_num(r.get("decode_tok_s")) or 0 for r in rows]
    ax.bar([x - width / 2 for x in xs], prefill, width, label="prefill tok/s")
    ax.bar([x + width / 2 for x in xs], decode, width, label="decode tok/s")
    ax.set_xticks(xs, _bar_labels(rows), fontsize=7)
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_ylabel("tokens / s (log scale)")
    ax.set_title("Speed per variant and backend")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if not rows:
        _no_data(ax, "evaluations")
    return _save(fig, path)


def plot_roofline(rows, path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.2))
    xs = list(range(len(rows)))
    values = [_num(r.get("roofline_pct")) or 0 for r in rows]
    bars = ax.bar(xs, values, color="tab:green")
    for bar, r in zip(bars, rows, strict=True):
        gbs = _num(r.get("achieved_gb_s"))
        if gbs is not None:
            ax.annotate(
                f"{gbs:.1f} GB/s",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(xs, _bar_labels(rows), fontsize=7)
    ax.set_ylabel("decode bandwidth, % of the device's peak")
    ax.set_title("Roofline: achieved / peak memory bandwidth during decode")
    ax.grid(axis="y", alpha=0.3)
    if not rows:
        _no_data(ax, "evaluations")
    return _save(fig, path)


def plot_resources(rows, path: Path) -> str:
    plt = _pyplot()
    rows = [r for r in rows if _num(r.get("measured_peak_mem_mb"))]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4.2))
    xs = list(range(len(rows)))
    width = 0.4
    ax.bar(
        [x - width / 2 for x in xs],
        [_num(r.get("predicted_as_run_mb")) or 0 for r in rows],
        width,
        label="predicted peak",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [_num(r.get("measured_peak_mem_mb")) or 0 for r in rows],
        width,
        label="measured peak",
    )
    for x, r in zip(xs, rows, strict=True):
        ratio = _num(r.get("mem_ratio"))
        top = max(_num(r.get("predicted_as_run_mb")) or 0, _num(r.get("measured_peak_mem_mb")) or 0)
        if ratio is not None:
            ax.annotate(f"x{ratio:.2f}", (x, top), ha="center", va="bottom", fontsize=7)
    labels = [f"{r['rule']}\n{r['model']} {r.get('target') or ''}".strip() for r in rows]
    ax.set_xticks(xs, labels, fontsize=7, rotation=30, ha="right")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_ylabel("MiB, log scale (RAM-disk bytes included)")
    ax.set_title("Memory per job: estimator vs measurement (predicted / measured above)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if not rows:
        _no_data(ax, "resource records")
    return _save(fig, path)


def read_loss_csv(path: str | os.PathLike) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """x column name and {series: [(x, y), ...]} from a fine-tune loss.csv: long format
    (``step, split, loss``: one series per split, e.g. train and heldout) or wide format (one
    series per column with "loss" in its name)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        xkey = next((k for k in ("step", "global_step", "epoch") if k in fields), None)
        long = "split" in fields and "loss" in fields
        ykeys = ["loss"] if long else [k for k in fields if "loss" in k.lower()]
        series: dict[str, list[tuple[float, float]]] = {}
        for i, line in enumerate(reader):
            x = _num(line.get(xkey)) if xkey else float(i)
            for k in ykeys:
                y = _num(line.get(k))
                if x is not None and y is not None:
                    name = str(line.get("split") or k) if long else k
                    series.setdefault(name, []).append((x, y))
    return xkey or "row", series


def plot_loss(model: str, loss_csv: str | os.PathLike, path: Path) -> str | None:
    xkey, series = read_loss_csv(loss_csv)
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None,
                label=name)  # fmt: skip
    ax.set_xlabel(xkey)
    ax.set_ylabel("loss")
    ax.set_title(f"Fine-tuning loss: {model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# The rule's entry point
# --------------------------------------------------------------------------------------------


def aggregate(
    eval_jsons: Sequence[str | os.PathLike],
    records: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike,
    out_md: str | os.PathLike,
    out_resources: str | os.PathLike,
    out_plots: str | os.PathLike,
    out_provenance: str | os.PathLike,
    loss_csvs: Mapping[str, str] | None = None,
    eval_estimates: Mapping[str, Sequence[Any]] | None = None,
    results: str | os.PathLike = "results",
    gguf_notes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write every output of aggregate_stats; return counts (for the log)."""
    workdir = Path(results).parent
    summary = summary_rows(eval_jsons, results, eval_estimates)
    resources = resource_rows(records, summary, workdir)
    plots_dir = Path(out_plots)
    with atomic.atomic_dir(plots_dir) as tmp:
        made = [
            plot_quality_vs_size(summary, tmp / "quality_vs_size.png"),
            plot_tokens_per_s(summary, tmp / "tokens_per_s.png"),
            plot_roofline(summary, tmp / "roofline.png"),
            plot_resources(resources, tmp / "resources.png"),
        ]
        finetune: dict[str, str] = {}
        for model, loss_csv in (loss_csvs or {}).items():
            if Path(loss_csv).is_file():
                made_loss = plot_loss(model, loss_csv, tmp / f"finetune_loss_{model}.png")
                if made_loss:
                    made.append(made_loss)
                    finetune[model] = f"plots/finetune_loss_{model}.png"
    plots = [str(plots_dir / Path(p).name) for p in made]
    prov = provenance.collect()
    atomic.write_text(out_csv, to_csv(summary, SUMMARY_COLUMNS))
    atomic.write_text(out_resources, to_csv(resources, RESOURCE_COLUMNS))
    atomic.write_text(out_md, markdown(summary, resources, plots, prov, finetune, gguf_notes))
    atomic.write_json(
        out_provenance,
        {
            "aggregate": prov,
            "inputs": {
                "eval": [str(p) for p in eval_jsons],
                "records": [str(p) for p in records],
                "loss": dict(loss_csvs or {}),
            },
            "runs": {r["eval_json"]: (r["_record"].get("provenance") or {}) for r in summary},
        },
    )
    return {"rows": len(summary), "resources": len(resources), "plots": len(plots)}
