"""Our finetune step vs a plain PEFT + transformers Trainer script, side by side.

    .venv/bin/python bench/bench_finetune.py --model results/models/smollm2/hf [--steps 16]
        [--batch-size 8] [--repeats 3] [--gradient-checkpointing]

Both train the same model with the same LoRA settings (r 16, alpha 32, the architecture's
default target modules), data (the built-in reverse_words task, ``steps x batch size``
examples, so each run sees every example exactly once), batch size, learning rate schedule and
steps, in fp32 on the CPU, each in a fresh process. They alternate (ours, plain, ours, plain,
...) so that a shared machine's load hits both alike; compare the medians.

- tokens/s: non-padding tokens trained on / time of the training loop (ours: ``train_seconds``
  in metrics.json, evaluation and checkpoints excluded; plain: ``trainer.train()``).
- peak RSS: the process's kernel high-water mark (``ru_maxrss``), model load included.

Both are transformers' Trainer with PEFT now; ours adds the loss on response tokens with the
output head from the first scored position only, our checkpoints' bookkeeping, the held-out
loss and the metrics callbacks. Goals: tokens/s ratio (ours / plain) >= 0.95, peak-RSS ratio
<= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llmpipe.finetune import dataset as ds  # noqa: E402
from llmpipe.finetune.launch import launch_env  # noqa: E402
from llmpipe.finetune.runner import write_spec  # noqa: E402
from llmpipe.finetune.settings import DATA, TRAIN, Settings, from_dict  # noqa: E402


def settings(args) -> dict:
    s = from_dict(
        {
            "learning_rate": 0.002,
            "lr_scheduler": "linear",
            "warmup_steps": 2,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "grad_accum": 1,
            "seq_len": 128,
            "gradient_checkpointing": args.gradient_checkpointing,
            "lora_dropout": 0.0,
            "eval_every": 10**6,  # ours evaluates at step 0 and at the end only
            "eval_examples": 8,
            "save_every": 10**6,
            "log_every": 10**6,
        }
    )
    return s.group(TRAIN)


def run_ours(spec: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "llmpipe.finetune.train", "--spec", str(spec)]
    subprocess.run(cmd, env=launch_env(threads, 1), check=True, capture_output=True)
    metrics = json.loads(Path(json.loads(spec.read_text())["metrics"]).read_text())
    keys = ("tokens", "train_seconds", "tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb")
    return {k: metrics[k] for k in keys}


def run_plain(spec: Path, threads: int) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "plain_trainer.py"), str(spec)]
    done = subprocess.run(
        cmd, env=launch_env(threads, 1), check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an HF model folder")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    data = {**Settings().group(DATA), "task_train_examples": args.steps * args.batch_size}
    ds.prepare(data, work / "train.jsonl", work / "heldout.jsonl")
    results: dict[str, list[dict]] = {"ours": [], "plain": []}
    for i in range(args.repeats):
        for name, runner in (("ours", run_ours), ("plain", run_plain)):
            out = work / f"{name}-{i}"
            spec = write_spec(
                out / "spec.json",
                model_id="bench",
                base_hf=str(Path(args.model).resolve()),
                train=str(work / "train.jsonl"),
                heldout=str(work / "heldout.jsonl"),
                settings=settings(args),
                adapter=str(out / "adapter"),
                loss_csv=str(out / "loss.csv"),
                metrics=str(out / "metrics.json"),
                checkpoints=str(out / "checkpoints"),
                threads=args.threads,
            )
            result = runner(spec, args.threads)
            results[name].append(result)
            print(
                f"{name:5s} #{i}: {result['tokens']} tokens in {result['train_seconds']:.1f} s "
                f"= {result['tokens_per_s']:.1f} tokens/s ({result['tokens_per_cpu_s']:.1f} per "
                f"CPU-s), peak RSS {result['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
    med = {
        name: {
            key: statistics.median(r[key] for r in rows)
            for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb")
        }
        for name, rows in results.items()
    }
    speed = med["ours"]["tokens_per_s"] / med["plain"]["tokens_per_s"]
    cpu_speed = med["ours"]["tokens_per_cpu_s"] / med["plain"]["tokens_per_cpu_s"]
    memory = med["ours"]["peak_rss_mb"] / med["plain"]["peak_rss_mb"]
    print(
        f"median tokens/s: ours {med['ours']['tokens_per_s']:.1f}, plain "
        f"{med['plain']['tokens_per_s']:.1f} -> ratio {speed:.2f} (goal >= 0.95)"
    )
    print(
        f"median tokens per CPU-second: ours {med['ours']['tokens_per_cpu_s']:.1f}, plain "
        f"{med['plain']['tokens_per_cpu_s']:.1f} -> ratio {cpu_speed:.2f} (robust to load)"
    )
    print(
        f"median peak RSS: ours {med['ours']['peak_rss_mb']:.0f} MiB, plain "
        f"{med['plain']['peak_rss_mb']:.0f} MiB -> ratio {memory:.2f} (goal <= 1.05)"
    )
    summary = {"speed_ratio": speed, "cpu_speed_ratio": cpu_speed, "memory_ratio": memory}
    print(json.dumps({"results": results, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
