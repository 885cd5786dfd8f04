"""The GPU check: our GPU path on a GPU machine's own torch, transformers, peft and accelerate.

    python3 bench/gpu_check.py [--device cuda|cpu] [--out DIR] [--wheels DIR] [--compile]

Needs only this repository's ``src/`` (none of our pins, no network): a ~1.1 B Llama (the shape
of TinyLlama-1.1B, random weights: the speed and memory of a real one of that shape) and a
byte-level BPE tokenizer trained in seconds on the repository's GPL text, both written under
``--out``. Prints, side by side:

1. evaluate, 10 prompts x 100 new tokens, fp16, the same sampling (temperature 1, top-k 50):
   the guide's per-prompt loop (model moved to the device and one prompt generated per
   iteration) vs our transformers evaluate (``hf_backend.generate``: batched, static cache)
   vs one plain batched ``model.generate``: tokens/s and ratios; peak VRAM against the
   estimator's prediction (``llmpipe.resources.plan``);
2. fine-tune: 20 LoRA and 20 QLoRA (nf4, fp16 compute) steps through our training process
   (``python -m llmpipe.finetune.train``: Trainer + PEFT): tokens/s and peak VRAM against the
   estimator's prediction for the same settings;
3. NVML: GPU memory and utilisation sampled during all of it (device-wide, so the training
   subprocesses count), its peak beside torch's; and ``llmpipe.hardware.check`` on this node.

The estimator plans for a V100-32GB (the cluster's GPU): its memory figures apply to any GPU,
its runtimes are V100 runtimes (printed for the record, not compared). QLoRA needs bitsandbytes:
if this machine lacks it, pass ``--wheels DIR`` holding its wheel (``pip download --no-deps
bitsandbytes==0.50.2 -d DIR`` where there is a network; about 60 MB, carried with the run); it
is installed with ``--no-deps`` under ``--out``. Without it the QLoRA row says "skipped".

``--device cpu`` is a smoke test of the same code (a tiny model, no QLoRA, no NVML): it runs in
about a minute on a laptop and is what CI-less machines can check. On one H200 the whole check
takes about 3 minutes (budget: 8). The last line is the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llmpipe.config import read_prompts  # noqa: E402
from llmpipe.evaluation import hf_backend as hb  # noqa: E402
from llmpipe.evaluation.records import Sampling  # noqa: E402
from llmpipe.finetune import dataset as ds  # noqa: E402
from llmpipe.finetune.launch import launch_env  # noqa: E402
from llmpipe.finetune.runner import write_spec  # noqa: E402
from llmpipe.finetune.settings import DATA, TRAIN, Settings, estimate_options, from_dict  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# TinyLlama-1.1B's shape (vocab: the tokenizer's); --device cpu: a tiny one.
SHAPES = {
    "cuda": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4),
    "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
# The tokenizer's special tokens (not secrets: ruff's S106 reads "token" as a password).
SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}  # fmt: skip
SAMPLING = {"max_new_tokens": 100, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def row(name: str, ours: str, theirs: str, verdict: str) -> None:
    ROWS.append((name, ours, theirs, verdict))
    say(f"  -> {name}: {ours} | {theirs} | {verdict}")


class NvmlSampler:
    """Device 0's used memory and utilisation every ``interval`` s (NVML, device-wide)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.samples, self.error = interval, [], None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as err:  # noqa: BLE001 - reported in the table
            self._nvml, self.error = None, f"{type(err).__name__}: {err}"
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self):
        while not self._stop.wait(self.interval):
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append((time.perf_counter(), mem.used / 2**20, float(util.gpu)))

    def peak_mb(self, since: float = 0.0) -> float | None:
        used = [mb for t, mb, _ in self.samples if t >= since]
        return max(used) if used else None


# ---- the model ---------------------------------------------------------------------------------


def make_model(folder: Path, device: str) -> Path:
    """A random-init Llama of SHAPES[device] and a BPE tokenizer with a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    text = (REPO / "config" / "eval" / "gpl-3.0.txt").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text + read_prompts(REPO / "config" / "prompts.txt"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(fast),
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float16",
        **SHAPES[device],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if device == "cuda" else "cpu"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.float16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


# ---- 1. evaluate -------------------------------------------------------------------------------


def guide_loop(model, tokenizer, prompts, device) -> tuple[int, float]:
    """The guide's loop, as written (return_tensors added: without it the loop cannot run)."""
    generated, start = 0, time.perf_counter()
    for prompt in prompts:
        inputs = tokenizer([prompt], return_tensors="pt").to(device)
        model.to(device)
        out = model.generate(**inputs, max_new_tokens=100, do_sample=True, top_k=50)
        generated += out.shape[1] - inputs["input_ids"].shape[1]
    hb.synchronize(device)
    return generated, time.perf_counter() - start


def plain_batched(model, tokenizer, prompts, device) -> tuple[int, float]:
    """One batched, left-padded ``model.generate`` of all prompts (no code of ours)."""
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    start = time.perf_counter()
    out = model.generate(
        **inputs, max_new_tokens=100, do_sample=True, top_k=50,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    hb.synchronize(device)
    seconds = time.perf_counter() - start
    new = out[:, inputs["input_ids"].shape[1] :]
    eos = tokenizer.eos_token_id
    tokens = 0
    for seq in new.tolist():
        tokens += next((i + 1 for i, t in enumerate(seq) if t == eos), len(seq))
    return tokens, seconds


def part_evaluate(folder: Path, device: str, compile: bool) -> None:
    import torch

    from llmpipe import resources

    say("== evaluate: the guide's loop vs ours vs one plain batched generate")
    prompts = read_prompts(REPO / "config" / "prompts.txt")
    settings = hb.HFSettings.from_config(
        {"device": device, "batch_size": 16, "compile": compile, "tune_threads": False},
        threads=os.cpu_count() or 2,
    )
    model, tokenizer, dev, dtype = hb.load(str(folder), settings)
    hb.warm_up(model, tokenizer, dev)
    warm = Sampling(max_new_tokens=4, temperature=1.0, top_k=50)
    hb.generate(model, tokenizer, dev, list(enumerate(prompts)), warm, 16, compile=compile)
    model.generate(**tokenizer(["Hello"], return_tensors="pt").to(dev), max_new_tokens=4)

    seed_tokens, seed_s = guide_loop(model, tokenizer, prompts, dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampling = Sampling(**SAMPLING)
    start = time.perf_counter()
    results, batches = hb.generate(
        model, tokenizer, dev, list(enumerate(prompts)), sampling, 16, compile=compile
    )
    ours_s = time.perf_counter() - start
    ours_tokens = sum(r.generated_tokens for r in results)
    peak_mb = torch.cuda.max_memory_reserved() / 2**20 if dev == "cuda" else None
    plain_tokens, plain_s = plain_batched(model, tokenizer, prompts, dev)
    ours_rate = ours_tokens / ours_s
    row(
        f"evaluate tok/s, {len(prompts)} prompts x 100 new, {dtype}: ours / the guide's loop",
        f"{ours_rate:.1f} ({ours_tokens} tokens, {ours_s:.2f} s)",
        f"{seed_tokens / seed_s:.1f} ({seed_tokens} tokens, {seed_s:.2f} s)",
        f"{ours_rate / (seed_tokens / seed_s):.2f}x",
    )
    row(
        "evaluate tok/s: ours / one plain batched model.generate (goal >= 1.0)",
        f"{ours_rate:.1f}",
        f"{plain_tokens / plain_s:.1f} ({plain_tokens} tokens, {plain_s:.2f} s)",
        f"{ours_rate / (plain_tokens / plain_s):.2f}x",
    )
    prefill = sum(b.prefill_s for b in batches)
    decode = sum(b.decode_s for b in batches)
    row("evaluate: our prefill / decode time (first-token clock)", f"{prefill:.3f} s",
        f"{decode:.3f} s", f"{sum(b.steps for b in batches)} decode steps")  # fmt: skip
    plan = resources.plan(
        "evaluate_transformers", folder / "config.json", hw="gpu", dtype="f16", batch=16,
        seq_len=max(len(hb.tokenize(tokenizer, p)) for p in prompts), new_tokens=100,
        samples=len(prompts), staged=False,
    )  # fmt: skip
    if peak_mb is not None:
        row("evaluate peak VRAM: measured (torch reserved) / estimator", f"{peak_mb:.0f} MiB",
            f"{plan.gpu_mem_mb} MiB (V100 plan)", f"{plan.gpu_mem_mb / peak_mb:.2f}x")  # fmt: skip
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()


# ---- 2. fine-tune ------------------------------------------------------------------------------


def bitsandbytes_path(out: Path, wheels: Path | None) -> tuple[str | None, str]:
    """(extra PYTHONPATH entry or None, note): bitsandbytes importable, installed from a
    carried wheel, or missing."""
    try:
        import bitsandbytes

        return "", f"bitsandbytes {bitsandbytes.__version__} (this machine's)"
    except ImportError:
        pass
    if wheels is None or not any(wheels.glob("bitsandbytes-*.whl")):
        return None, "bitsandbytes not importable and no wheel given (--wheels)"
    target = out / "site"
    wheel = sorted(wheels.glob("bitsandbytes-*.whl"))[-1]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
         str(target), str(wheel)], check=True, capture_output=True,
    )  # fmt: skip
    return str(target), f"{wheel.name} (carried, installed under {target})"


def part_finetune(folder: Path, device: str, out: Path, steps: int, wheels: Path | None) -> None:
    from llmpipe import resources

    say("== fine-tune: LoRA and QLoRA steps through our training process")
    data = out / "data"
    ds.prepare({**Settings().group(DATA), "task_train_examples": steps * 8},
               data / "train.jsonl", data / "heldout.jsonl")  # fmt: skip
    methods = ["lora"] + (["qlora"] if device == "cuda" else [])
    for method in methods:
        extra_path, note = ("", "") if method == "lora" else bitsandbytes_path(out, wheels)
        if extra_path is None:
            row(f"fine-tune {method}, {steps} steps", "skipped", note, "-")
            continue
        settings = from_dict(
            {"method": method, "device": device, "batch_size": 8, "grad_accum": 1,
             "seq_len": 256, "max_steps": steps, "eval_every": 10**6, "eval_examples": 8,
             "save_every": 10**6, "log_every": 5, "learning_rate": 2e-4,
             "gradient_checkpointing": True},
        )  # fmt: skip
        run = out / f"ft-{method}"
        spec = write_spec(
            run / "spec.json", model_id="gpu-check", base_hf=str(folder),
            train=str(data / "train.jsonl"), heldout=str(data / "heldout.jsonl"),
            settings=settings.group(TRAIN), adapter=str(run / "adapter"),
            loss_csv=str(run / "loss.csv"), metrics=str(run / "metrics.json"),
            checkpoints=str(run / "checkpoints"), threads=os.cpu_count() or 2,
        )  # fmt: skip
        env = launch_env(os.cpu_count() or 2, 1)
        if extra_path:
            env["PYTHONPATH"] = os.pathsep.join([extra_path, env["PYTHONPATH"]])
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "llmpipe.finetune.train", "--spec", str(spec)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            row(f"fine-tune {method}, {steps} steps", "FAILED", tail[:160], "-")
            (run / "stderr.txt").write_text(done.stderr)
            continue
        m = json.loads((run / "metrics.json").read_text())
        opts = estimate_options(settings, steps * 8, None)
        longest = max(len(json.loads(line)["instruction"]) for line in
                      (data / "train.jsonl").read_text().splitlines())  # fmt: skip
        opts["seq_len"] = min(256, longest + 96)  # tokens ~ bytes here: a bound
        plan = resources.plan("finetune", folder / "config.json", **opts)
        peak = m.get("peak_gpu_mem_mb") or 0
        row(
            f"fine-tune {method}, {steps} steps x 8 examples: tokens/s, peak VRAM / estimator",
            f"{m['tokens_per_s']:.0f} tok/s, {peak:.0f} MiB (allocated)",
            f"{plan.gpu_mem_mb} MiB, {plan.runtime_s} s (V100 plan){' ' + note if note else ''}",
            f"{plan.gpu_mem_mb / peak:.2f}x memory" if peak else "-",
        )
        say(f"  ({method}: {m['tokens']} tokens in {m['train_seconds']} s, whole process "
            f"{time.perf_counter() - start:.0f} s, loss {m['loss']})")  # fmt: skip


# ---- main --------------------------------------------------------------------------------------


def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "nvidia-ml-py")
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--wheels", type=Path, help="a folder with the bitsandbytes wheel")
    parser.add_argument("--compile", action="store_true", help="evaluate.transformers.compile")
    args = parser.parse_args()
    import torch

    from llmpipe import hardware

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    say(f"versions: {versions()}; CUDA {torch.version.cuda}, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")  # fmt: skip
    if args.device == "cuda":
        try:
            facts = hardware.check(hardware.Need("gpu_check", torch=True, granted=1))
            row("llmpipe.hardware.check on this node", "ok", str(facts.get("torch_devices")), "-")
        except Exception as err:  # noqa: BLE001 - the table says what failed
            row("llmpipe.hardware.check on this node", "FAILED", str(err)[:160], "-")
    started = time.perf_counter()
    with NvmlSampler() as nvml:
        t0 = time.perf_counter()
        folder = make_model(out / "model", args.device)
        say(f"model ready in {time.perf_counter() - t0:.0f} s: {folder}")
        part_evaluate(folder, args.device, args.compile)
        part_finetune(folder, args.device, out, args.steps, args.wheels)
    if args.device == "cuda":
        peak = nvml.peak_mb()
        row(
            "NVML sampling (device 0, every 0.2 s, whole check)",
            f"{len(nvml.samples)} samples, peak {peak:.0f} MiB used" if peak else "no samples",
            nvml.error or f"max util {max((u for *_, u in nvml.samples), default=0):.0f} %",
            "ok" if nvml.samples else "FAILED",
        )
    say(f"whole check: {time.perf_counter() - started:.0f} s")
    width = [max(len(r[i]) for r in ROWS) for i in range(4)] if ROWS else [0] * 4
    header = ("check", "ours / measured", "reference / predicted", "ratio")
    print(" | ".join(h.ljust(w) for h, w in zip(header, width, strict=True)))
    for r in ROWS:
        print(" | ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))
    table = [dict(zip(header, r, strict=True)) for r in ROWS]
    (out / "gpu_check.json").write_text(json.dumps(table, indent=2))
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
