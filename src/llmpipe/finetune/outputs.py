"""What a fine-tune leaves besides the adapter: the loss curve and the metrics (throughput,
FLOPs, losses, provenance)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from llmpipe import atomic, provenance
from llmpipe.finetune.settings import Settings

LOSS_FIELDS = ("step", "epoch", "split", "loss", "tokens", "seconds")


def loss_rows(history: list[dict], steps_per_epoch: int) -> list[dict]:
    """The loss curve from Trainer's log history: one train row per step, held-out rows."""
    rows = []
    for h in history:
        for key, split in (("loss", "train"), ("eval_loss", "heldout")):
            if key in h:
                rows.append(
                    {
                        "step": h["step"],
                        "epoch": round(h["step"] / steps_per_epoch, 4),
                        "split": split,
                        "loss": round(h[key], 6),
                        "tokens": h.get("tokens", 0),
                        "seconds": h.get("train_seconds", 0.0),
                    }
                )
    return rows


def write_loss_csv(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOSS_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())


def build_metrics(facts: dict, base_hf: str, s: Settings, history: list[dict], n_lora: int):
    """The run's figures: throughput, memory (in ``facts``), FLOPs, losses, provenance."""
    from llmpipe.estimate import ModelShape
    from llmpipe.finetune import flops

    last = [h for h in history if "train_seconds" in h][-1]
    tokens, scored = int(last["tokens"]), int(last["scored_tokens"])
    seconds, cpu_seconds = last["train_seconds"], last.get("train_cpu_seconds", 0.0)
    shape = ModelShape.from_config(Path(base_hf) / "config.json")
    counts = flops.FlopCounts.of(shape, n_lora)
    mean_seq = last["square_tokens"] / max(tokens, 1)  # token-weighted sequence length
    lora = flops.lora_flops(counts, tokens, scored, mean_seq, s.gradient_checkpointing)
    full = flops.full_flops(counts, tokens, mean_seq)
    heldout = [h["eval_loss"] for h in history if "eval_loss" in h]
    train_losses = [h["loss"] for h in history if "loss" in h]
    return {
        **facts,
        "examples_seen": facts["steps"] * s.batch_size * s.grad_accum * facts["processes"],
        "tokens": tokens,
        "scored_tokens": scored,
        "train_seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 2),
        # CPU time of process 0 only (a shared machine's load barely changes it):
        "train_cpu_seconds": round(cpu_seconds, 3),
        "tokens_per_cpu_s": round(tokens / facts["processes"] / max(cpu_seconds, 1e-9), 2),
        "trainable_params": n_lora,
        "base_params": shape.n_params,
        "flops": {
            "total": lora,
            "per_token": lora / max(tokens, 1),
            "full_finetune_equivalent": full,
            "lora_over_full": round(lora / full, 4) if full else None,
            "achieved_per_s": lora / max(seconds, 1e-9),
            "formula": "llmpipe.finetune.flops (LoRA: 4 N_body + 6 N_lora per token, "
            "4 N_head per scored token, + attention; full: 6 N per token)",
            "n_body": counts.body,
            "n_head": counts.head,
            "n_lora": counts.lora,
            "mean_sequence_tokens": round(mean_seq, 2),
        },
        "loss": {
            "heldout_first": heldout[0] if heldout else None,
            "heldout_last": heldout[-1] if heldout else None,
            "train_first": train_losses[0] if train_losses else None,
            "train_last": train_losses[-1] if train_losses else None,
        },
        "provenance": provenance.collect(seed=s.seed),
    }
