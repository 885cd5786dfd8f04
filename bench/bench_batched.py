"""llama.cpp batched decoding: our backend beside llama-batched-bench, side by side in one run.

    .venv/bin/python bench/bench_batched.py --run WORKDIR [--cache DIR] [--npl 1,4,8,16]
        [--ntg 32] [--rounds 2] [--threads 2]

WORKDIR is a finished default run (its SmolLM2 Q8_0 GGUF, and its tokenizer for the ~1.2 B
random-init Llama that ``bench_evaluate.big_model`` makes once under DIR, default .deps/bench/,
Q8_0 here). For each model and each npl (prompts decoded together):

- ours: ``llama_backend.decode`` (what evaluate_shard runs) with ``parallel`` = npl on npl of
  the default prompts (cycled), greedy, each prompt run to ntg decode tokens (no stop at
  end-of-generation, as the tool); the aggregate decode tok/s = decode tokens / the decode
  steps' time (``decode_tok_s_aggregate``: argmax sampling and the step's bookkeeping
  included).
- theirs: ``llama-batched-bench`` from the pinned build at the same npl: the same GGUF, the
  same context (npl x n_ctx cells, n_ctx per sequence, not unified), threads, batch sizes,
  flash attention and weight repacking (off, evaluate.llama_cpp.repack's default); -npp =
  our prompts' mean length, -ntg = ntg; its S_TG (npl x ntg / t_tg,
  random tokens, no sampling).

Rounds alternate ours and theirs; each side's best round counts (a shared host only ever slows
a run down). Printed: ours / tool at each npl (goal >= 0.95) and the speed-up of npl 8 over
npl 1, ours and the tool's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

import bench_evaluate as be  # noqa: E402

from llmpipe.config import read_prompts  # noqa: E402
from llmpipe.evaluation import llama_backend as lb  # noqa: E402
from llmpipe.evaluation.records import Sampling  # noqa: E402

N_CTX = 256  # per sequence: the prompt and ntg tokens fit
TOOL = be.TOOLS / "llama-batched-bench"


def settings(npl: int, threads: int) -> lb.LlamaSettings:
    section = {"n_ctx": N_CTX, "parallel": npl, "tune_threads": False, "flash_attn": True}
    return lb.LlamaSettings.from_config(section, threads)


def prompts_for(npl: int) -> list[tuple[int, str]]:
    lines = read_prompts(be.PROMPTS)
    return [(i, lines[i % len(lines)]) for i in range(npl)]


def mean_prompt_tokens(gguf: Path, npl: int, threads: int) -> int:
    llm = lb.load(str(gguf), settings(1, threads))
    try:
        return round(statistics.mean(len(lb.tokenize(llm, p)) for _, p in prompts_for(npl)))
    finally:
        llm.close()


def ours(gguf: Path, npl: int, ntg: int, threads: int) -> float:
    """Aggregate decode tok/s of our backend with npl sequences."""
    llm = lb.load(str(gguf), settings(npl, threads), parallel=npl)
    try:
        lb.warm_up(llm)
        run = lb.decode(llm, prompts_for(npl), Sampling(max_new_tokens=ntg + 1), stop_at_eog=False)
    finally:
        llm.close()
    tokens = sum(r.decode_tokens for r in run.results)
    assert tokens == npl * ntg, tokens
    return tokens / run.decode_s


def theirs(gguf: Path, npl: int, npp: int, ntg: int, threads: int) -> float:
    """llama-batched-bench's S_TG at npl, with our context and settings."""
    s = settings(npl, threads)
    cmd = [str(TOOL), "-m", str(gguf), "-c", str(npl * N_CTX), "-b", str(s.n_batch)]
    cmd += ["-ub", str(s.n_ubatch), "-t", str(threads), "-tb", str(threads), "-fa", "on"]
    cmd += ["-npp", str(npp), "-ntg", str(ntg), "-npl", str(npl), "--output-format", "jsonl"]
    cmd += ["--repack" if s.repack else "--no-repack"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    (result,) = [r for r in rows if r["pl"] == npl]
    return float(result["speed_tg"])


def bench_model(name: str, gguf: Path, npls: list[int], ntg: int, rounds: int, threads: int):
    npp = mean_prompt_tokens(gguf, max(npls), threads)
    be.say(f"== {name}: {gguf.name}, npp {npp}, ntg {ntg}, n_ctx {N_CTX} per sequence")
    best: dict[int, tuple[float, float]] = {}
    for rnd in range(rounds):
        for npl in npls:
            a = ours(gguf, npl, ntg, threads)
            b = theirs(gguf, npl, npp, ntg, threads)
            be.say(f"  round {rnd + 1} npl {npl:2d}: ours {a:7.1f} tool {b:7.1f} tok/s")
            old = best.get(npl, (0.0, 0.0))
            best[npl] = (max(old[0], a), max(old[1], b))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path.cwd(), help="a finished default run")
    ap.add_argument("--cache", type=Path, default=be.BENCH_DIR, help="where the 1.2 B model is")
    ap.add_argument("--npl", default="1,4,8,16")
    ap.add_argument("--ntg", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,llama-1b")
    ap.add_argument("--smollm2", type=Path, help="SmolLM2 GGUF (default: the run's Q8_0)")
    args = ap.parse_args()
    if not TOOL.is_file():
        sys.exit(f"{TOOL} is missing: build the pinned tools (make setup)")
    npls = [int(x) for x in args.npl.split(",")]
    models = {
        "smollm2": lambda: (
            "SmolLM2-135M Q8_0",
            args.smollm2 or args.run / "results/gguf/smollm2/smollm2-Q8_0.gguf",
        ),
        "llama-1b": lambda: (
            "random Llama 1.2B Q8_0",
            be.big_model(args.run, args.cache, ("Q8_0",))[1]["Q8_0"],
        ),
    }
    table = []
    for key in args.models.split(","):
        name, gguf = models[key]()
        best = bench_model(name, gguf, npls, args.ntg, args.rounds, args.threads)
        for npl in npls:
            a, b = best[npl]
            table.append((name, str(npl), f"{a:.1f}", f"{b:.1f}", f"{a / b:.3f}"))
        if 1 in best and 8 in best:
            ours8, tool8 = best[8][0] / best[1][0], best[8][1] / best[1][1]
            table.append((name, "8 / 1", f"x{ours8:.2f}", f"x{tool8:.2f}", "speed-up"))
    head = ("model", "npl", "ours agg tok/s", "batched-bench S_TG", "ours / tool (>= 0.95)")
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *table]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
