"""The prompt farm: split the prompts into shards (one Slurm job each) and gather the results.

A shard is a contiguous block of prompt lines (sizes differ by at most one), recorded with the
prompts' line indices, so the gathered result lists every prompt once, in file order, whatever
the shard count. Totals are sums over the shards; rates are recomputed from the summed times;
``wall_s`` is the farm's wall time, from the first shard's start to the last one's end (shards
may run in parallel on different nodes), and ``tokens_per_min`` is measured over it.

Decode speed comes in two figures, for both backends (``decode_speeds``): the aggregate, every
decode token over the time of the decode steps (several prompts share a step: llama.cpp's
``parallel`` sequences, a transformers batch), and the per-sequence speed one prompt's stream
sees, every decode token over the summed time each prompt spent in the steps it took part in.
One prompt at a time, the two are equal.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from llmpipe import atomic
from llmpipe.config import read_prompts
from llmpipe.evaluation import figures

# The keys of one shard's JSON that are summed when shards are gathered.
SUMMED = (
    "prompt_tokens",
    "generated_tokens",
    "decode_tokens",
    "decode_steps",
    "prefill_s",
    "decode_s",
    "sequence_decode_s",
    "generate_s",
    "flops",
    "decode_bytes",
    "gb_disk_to_device",
)


DECODE_SPEEDS = ("decode_tok_s_aggregate", "decode_tok_s_per_sequence")


def decode_speeds(decode_tokens: int, decode_s: float, sequence_decode_s: float) -> dict:
    """Aggregate and per-sequence decode tok/s (see the module docstring); None without time."""
    return {
        "decode_tok_s_aggregate": decode_tokens / decode_s if decode_s else None,
        "decode_tok_s_per_sequence": (
            decode_tokens / sequence_decode_s if sequence_decode_s else None
        ),
    }


def split(n_items: int, n_shards: int) -> list[range]:
    """``n_shards`` contiguous blocks covering ``range(n_items)`` (empty blocks when too few)."""
    if n_shards < 1:
        raise ValueError(f"farm.shards={n_shards}: expected at least 1")
    base, extra = divmod(n_items, n_shards)
    blocks, start = [], 0
    for shard in range(n_shards):
        size = base + (1 if shard < extra else 0)
        blocks.append(range(start, start + size))
        start += size
    return blocks


def write_shards(prompts_path: str | os.PathLike, outputs: list[str | os.PathLike]) -> None:
    """One JSON per shard: ``{"shard": k, "of": n, "prompts": [[line index, prompt], ...]}``."""
    prompts = read_prompts(prompts_path)
    for k, (block, out) in enumerate(zip(split(len(prompts), len(outputs)), outputs, strict=True)):
        atomic.write_json(
            out,
            {
                "shard": k + 1,
                "of": len(outputs),
                "source": str(prompts_path),
                "prompts": [[i, prompts[i]] for i in block],
            },
        )


def read_shard(path: str | os.PathLike) -> list[tuple[int, str]]:
    import json

    data = json.loads(Path(path).read_text())
    return [(int(i), str(p)) for i, p in data["prompts"]]


def gather(shards: list[dict]) -> dict:
    """One result from the shards' results (see the module docstring)."""
    if not shards:
        raise ValueError("no shard results to gather")
    out: dict = {key: sum(s.get(key) or 0 for s in shards) for key in SUMMED}
    worked = [s for s in shards if s["prompts"]]
    started = min(s["started_at"] for s in shards)
    finished = max(s["finished_at"] for s in shards)
    out["wall_s"] = finished - started
    out["tokens_per_min"] = 60 * out["generated_tokens"] / out["wall_s"] if out["wall_s"] else None
    out["prefill_tok_s"] = out["prompt_tokens"] / out["prefill_s"] if out["prefill_s"] else None
    out.update(decode_speeds(out["decode_tokens"], out["decode_s"], out["sequence_decode_s"]))
    out["decode_sequences"] = max(s.get("decode_sequences") or 1 for s in shards)
    out["load_s"] = sum(s["load_s"] for s in shards) / len(shards)
    out["load_source"] = _one_or_mixed(s["load_source"] for s in shards)
    out["peak_rss_mb"] = max(s["peak_rss_mb"] for s in shards)
    vram = [s["peak_vram_mb"] for s in shards if s.get("peak_vram_mb") is not None]
    out["peak_vram_mb"] = max(vram) if vram else None
    peaks = [s["peak_bandwidth_gb_s"] for s in shards if s.get("peak_bandwidth_gb_s")]
    # Shards on different hosts may see different peaks: the roofline uses their mean.
    peak = sum(peaks) / len(peaks) if peaks else None
    out.update(
        figures.rates(
            decode_bytes=out["decode_bytes"],
            decode_tokens=out["decode_tokens"],
            decode_s=out["decode_s"],
            peak_gb_s=peak,
        )
    )
    maxima = [s["achieved_gb_s_max"] for s in worked if s.get("achieved_gb_s_max") is not None]
    out["achieved_gb_s_max"] = max(maxima) if maxima else None
    out["shards"] = len(shards)
    out["devices"] = sorted({s["device"] for s in shards})
    out["hosts"] = sorted({s["host"] for s in shards})
    prompts = sorted((p for s in shards for p in s["prompts"]), key=lambda p: p["index"])
    indices = [p["index"] for p in prompts]
    if len(set(indices)) != len(indices):
        raise ValueError("a prompt appears in two shards")
    out["prompts"] = prompts
    for key, value in list(out.items()):
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
    return out


def _one_or_mixed(values) -> str:
    values = set(values)
    return values.pop() if len(values) == 1 else "mixed"
