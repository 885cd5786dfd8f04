"""Base vs tuned on the held-out set, in one table: task accuracy and perplexity.

- **accuracy**: greedy generation from the chat-templated prompt; a prediction is correct when,
  stripped of surrounding white space, it equals the reference response exactly;
- **perplexity**: exp of the mean negative log-likelihood of the reference response tokens
  (end-of-turn included) given the prompt — the quantity the fine-tune minimises.

Both models are prompted identically (the tuned model's chat template is the base's, or the
fallback template training used). Results: ``comparison.csv`` and ``comparison.md`` (one row per
model), ``predictions.jsonl`` (every held-out example with both models' answers) and
``comparison.json`` (both rows, settings, the job's resources, provenance).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

from llmpipe import atomic, provenance
from llmpipe.finetune import dataset as ds

COLUMNS = (
    "role",
    "model",
    "examples",
    "correct",
    "accuracy",
    "perplexity",
    "mean_nll",
    "scored_tokens",
    "seconds",
)


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def evaluate_model(
    hf_dir: str | os.PathLike,
    records: list[dict[str, Any]],
    *,
    batch_size: int = 16,
    device: str = "cpu",
    max_new_tokens: int | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Accuracy and perplexity of one HF model on ``records``; also its predictions."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ds.ensure_chat_template(tokenizer)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    pad_id = ds.pad_token_id(tokenizer)
    if max_new_tokens is None:
        longest = max(
            len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records
        )
        max_new_tokens = longest + 8  # a longer answer cannot match exactly anyway

    predictions: list[str] = []
    nll = 0.0
    scored = 0
    with torch.no_grad():
        for begin in range(0, len(records), batch_size):
            batch = records[begin : begin + batch_size]
            prompts = [ds.prompt_ids(tokenizer, r) for r in batch]
            width = max(map(len, prompts))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(prompts):  # left padding for generation
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            for row in out[:, width:]:
                predictions.append(tokenizer.decode(row, skip_special_tokens=True))
            examples = [ds.tokenize(tokenizer, r, seq_len=10**9) for r in batch]
            tensors = {k: v.to(device) for k, v in ds.collate(examples, pad_id).items()}
            logits = model(
                input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
            ).logits[:, :-1]
            target = tensors["labels"][:, 1:]
            keep = target != ds.IGNORE
            nll += float(F.cross_entropy(logits[keep].float(), target[keep], reduction="sum"))
            scored += int(keep.sum())
    correct = sum(exact_match(p, r["response"]) for p, r in zip(predictions, records, strict=True))
    mean_nll = nll / max(scored, 1)
    result = {
        "examples": len(records),
        "correct": correct,
        "accuracy": round(correct / len(records), 4),
        "perplexity": round(math.exp(mean_nll), 4),
        "mean_nll": round(mean_nll, 6),
        "scored_tokens": scored,
        "seconds": round(time.perf_counter() - start, 2),
        "max_new_tokens": max_new_tokens,
    }
    return result, predictions


def release_memory(device: str) -> None:
    """Hand the freed model back before the next one loads. glibc keeps freed heap pages
    resident (its mmap threshold rises after the first large free), so without a trim the
    second model's peak sits on the first one's leftovers, by an amount that varies with the
    machine's load."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def compare(
    *,
    base_hf: str,
    tuned_hf: str,
    heldout: str,
    base_id: str,
    tuned_id: str,
    settings: dict[str, Any],
    out_csv: str,
    out_md: str,
    out_predictions: str,
    out_json: str | None = None,
    threads: int | None = None,
    extra: Callable[[dict], dict] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate base and tuned on the held-out set; write the table and the predictions, and
    (``out_json``) a record of both rows with the settings, ``extra(record)``'s keys (the
    job's predicted and measured resources) and the provenance."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from llmpipe.finetune.train import choose_device

    device = choose_device(settings.get("device", "auto"), "lora")
    records = ds.read_jsonl(heldout)
    if settings.get("compare_examples"):
        records = records[: settings["compare_examples"]]
    rows = []
    answers: dict[str, list[str]] = {}
    for role, model_id, path in (("base", base_id, base_hf), ("tuned", tuned_id, tuned_hf)):
        result, predictions = evaluate_model(
            path, records, batch_size=settings.get("compare_batch_size", 16), device=device
        )
        rows.append({"role": role, "model": model_id, **result})
        answers[role] = predictions
        release_memory(device)
        print(
            f"{role} ({model_id}): accuracy {result['accuracy']:.3f} "
            f"({result['correct']}/{result['examples']}), perplexity {result['perplexity']:.3f}",
            flush=True,
        )
    write_table(rows, out_csv, out_md, heldout)
    lines = []
    for i, r in enumerate(records):
        line = {"instruction": r["instruction"], "reference": r["response"]}
        for role, predictions in answers.items():
            line[role] = predictions[i]
            line[f"{role}_correct"] = exact_match(predictions[i], r["response"])
        lines.append(json.dumps(line, ensure_ascii=False))
    atomic.write_text(out_predictions, "".join(line + "\n" for line in lines))
    if out_json is not None:
        record = {
            "model": base_id,
            "tuned": tuned_id,
            "heldout": heldout,
            "device": device,
            "rows": rows,
            "settings": dict(settings),
        }
        if extra is not None:
            record.update(extra(record))
        record["provenance"] = provenance.collect()
        atomic.write_json(out_json, record)
    return rows


def write_table(rows: list[dict[str, Any]], out_csv: str, out_md: str, heldout: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(out_csv, buf.getvalue())
    md = [
        f"Base vs tuned on the held-out set ({rows[0]['examples']} examples of {heldout}).",
        "",
        "| role | model | accuracy (exact match) | perplexity (response tokens) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['role']} | {r['model']} | {r['accuracy']:.3f} ({r['correct']}/{r['examples']})"
            f" | {r['perplexity']:.3f} |"
        )
    if len(rows) == 2:
        gain = rows[1]["accuracy"] - rows[0]["accuracy"]
        md += ["", f"Accuracy gain: {gain:+.3f}; perplexity ratio tuned/base: "
               f"{rows[1]['perplexity'] / rows[0]['perplexity']:.3f}."]  # fmt: skip
    atomic.write_text(out_md, "\n".join(md) + "\n")
