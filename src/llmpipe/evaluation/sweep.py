"""The ``evaluate_sweep`` rule: llama-bench's threads x n_gpu_layers grid of the GGUF variants.

A llama.cpp benchmark by definition (llama-bench's ``pp`` and ``tg`` tests on every GGUF
variant), so it calls the llama.cpp backend's parts directly rather than the ``Backend``
interface; the table goes to ``results/eval/{model}/sweep-llama.cpp.{tsv,md}``.
"""

from __future__ import annotations

from pathlib import Path

from llmpipe import atomic
from llmpipe.evaluation import figures


def run_sweep(
    *,
    model_id: str,
    ggufs: dict[str, str],
    settings: dict,
    threads: list[int],
    n_gpu_layers: list[int],
    n_prompt: int,
    n_gen: int,
    repetitions: int,
    out_tsv: str,
    out_md: str,
) -> list[dict]:
    """llama-bench's grid: every GGUF variant x threads x n_gpu_layers, pp and tg tok/s."""
    from llmpipe.evaluation import llama_backend as lb

    rows = []
    for variant, gguf in ggufs.items():
        for ngl in n_gpu_layers:
            for t in threads:
                cfg = lb.LlamaSettings.from_config(
                    {**settings, "n_threads": t, "n_threads_batch": t, "n_gpu_layers": ngl}, t
                )
                llm = lb.load(gguf, cfg, n_ctx=max(n_prompt + n_gen, 64), n_batch=max(n_prompt, 1))
                try:
                    result = lb.bench(llm, n_prompt, n_gen, repetitions)
                finally:
                    llm.close()
                row = {
                    "model": model_id,
                    "variant": variant,
                    "size_gb": round(Path(gguf).stat().st_size / figures.GB, 3),
                    "threads": t,
                    "n_gpu_layers": ngl,
                    "flash_attn": cfg.flash_attn,
                    "kv_type": cfg.kv_type,
                    "n_prompt": n_prompt,
                    "n_gen": n_gen,
                    **{k: (round(v, 2) if v is not None else None) for k, v in result.items()},
                }
                print(row, flush=True)
                rows.append(row)
    columns = list(rows[0]) if rows else []
    cell = lambda v: "" if v is None else str(v)  # noqa: E731
    tsv = ["\t".join(columns)] + ["\t".join(cell(r[c]) for c in columns) for r in rows]
    atomic.write_text(out_tsv, "\n".join(tsv) + "\n")
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    atomic.write_text(out_md, "\n".join(md) + "\n")
    return rows
