"""The training process: ``python -m llmpipe.finetune.train --spec spec.json`` (or torchrun).

One loop for every placement: one CPU process, one GPU, DDP over GPUs (or CPU processes, gloo)
or FSDP. What it does, in order:

1. fail fast: QLoRA without CUDA, bitsandbytes missing, bf16 on a GPU without it (V100);
2. tokenise the train and held-out splits with the model's chat template (loss on responses);
3. load the base model — frozen, in fp16 on a GPU (fp32 on the CPU), or 4/8-bit through
   bitsandbytes for QLoRA with fp16 compute — and add LoRA adapters (fp32, trainable);
4. resume from the newest matching checkpoint, if any;
5. per optimizer step, ``grad_accum`` micro-batches of ``batch_size`` examples on every process;
   the loss is the mean over the global batch's response tokens (exact, however the tokens fall
   into micro-batches and processes); fp16 autocast with a dynamic loss scale on GPUs; gradient
   clipping; warm-up then cosine/linear decay;
6. held-out loss before the first step, every ``eval_every`` steps and at the end;
7. a checkpoint every ``save_every`` steps; at the end the adapter (PEFT format), the loss curve
   (CSV) and the metrics (tokens/s, peak memory, FLOPs, provenance).

Compared with a plain PEFT + ``transformers.Trainer`` script on the same settings (bench/), the
loop computes the output head only at the scored positions: the logits of prompt and padding
tokens (vocab-sized, the largest activation of a small model) are never formed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from llmpipe import atomic, provenance
from llmpipe.errors import PipelineError, ResourceError
from llmpipe.finetune import checkpoint as ckpt
from llmpipe.finetune import dataset as ds
from llmpipe.finetune import distributed as dd
from llmpipe.finetune.settings import Settings, from_dict, target_modules

# transformers model types whose logits are plain ``lm_head(hidden)``: the head may then be
# applied to the scored positions only. Others (soft-capped or scaled logits) run the full head.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "falcon", "RefinedWeb", "RefinedWebModel"}
LOSS_FIELDS = ("step", "epoch", "split", "loss", "tokens", "seconds")


def log(message: str, d: dd.Dist | None = None) -> None:
    if d is None or d.is_main:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Precision and model
# --------------------------------------------------------------------------------------------


def choose_precision(precision: str, device: str) -> str:
    """fp16 on CUDA (V100 has no bf16), fp32 on the CPU; bf16 only where the GPU has it."""
    import torch

    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if precision in ("fp16", "bf16") and device != "cuda":
        raise PipelineError(f"finetune.precision: {precision} needs a GPU; use fp32 on the CPU")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise ResourceError(
            f"finetune.precision: bf16, but {name} has no bf16 support (V100: sm_70); use fp16"
        )
    return precision


class ResponseLoss:
    """Builds the module that returns (sum of token losses, scored tokens) for a batch."""

    @staticmethod
    def build(peft_model):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class _Module(nn.Module):
            def __init__(self, peft):
                super().__init__()
                self.peft = peft
                base = peft.get_base_model()
                self.selective = getattr(base.config, "model_type", None) in PLAIN_HEAD

            def forward(self, input_ids, attention_mask, labels):
                base = self.peft.get_base_model()
                target = labels[:, 1:]
                scored = target != ds.IGNORE
                if self.selective:
                    out = base.get_decoder()(
                        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                    )
                    hidden = out.last_hidden_state[:, :-1][scored]
                    logits = base.get_output_embeddings()(hidden)
                else:
                    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    logits = out.logits[:, :-1][scored]
                loss = F.cross_entropy(logits.float(), target[scored], reduction="sum")
                return loss, scored.sum().to(torch.float32)

        return _Module(peft_model)


def load_model(base_hf: str, s: Settings, device: str, precision: str, d: dd.Dist):
    """The base model with LoRA adapters (PEFT), on this process's device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    compute = dtypes[precision]
    kwargs: dict[str, Any] = {"dtype": compute, "attn_implementation": "sdpa"}
    if s.method == "qlora":
        from transformers import BitsAndBytesConfig

        four_bit = s.qlora_quant in ("nf4", "fp4")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=four_bit,
            load_in_8bit=not four_bit,
            bnb_4bit_quant_type=s.qlora_quant if four_bit else "nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": d.local_rank}
    model = AutoModelForCausalLM.from_pretrained(base_hf, **kwargs)
    model.config.use_cache = False
    if s.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=s.gradient_checkpointing
        )
    elif not (s.strategy == "fsdp" and d.enabled):
        model.to(d.device)  # FSDP moves each shard to its device itself
    torch.manual_seed(s.seed)  # the same adapter initialisation on every process
    lora = LoraConfig(
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=target_modules(s, getattr(model.config, "model_type", None)),
        task_type="CAUSAL_LM",
        bias="none",
    )
    peft_model = get_peft_model(model, lora)  # adapters in fp32 (autocast_adapter_dtype)
    if s.gradient_checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return peft_model


def decoder_layers(peft_model) -> list:
    """The repeated blocks FSDP shards one by one."""
    decoder = peft_model.get_base_model().get_decoder()
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if blocks is not None:
            return list(blocks)
    return []


def lr_lambda(s: Settings, total_steps: int):
    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)
        if s.lr_scheduler == "constant":
            return 1.0
        progress = (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps)
        progress = min(1.0, progress)
        if s.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class Run:
    """State of one training run (kept across steps, saved in checkpoints)."""

    def __init__(self):
        self.history: list[dict[str, Any]] = []
        self.tokens = 0  # non-padding tokens trained on, all processes
        self.scored = 0  # of which scored (response) tokens
        self.train_seconds = 0.0  # forward/backward/optimizer time, excluding evals and saves
        self.train_cpu_seconds = 0.0  # this process's CPU time in the same spans (all threads)
        self.sequence_tokens = 0  # sum over examples of their length (for attention FLOPs)
        self.examples = 0

    def state(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "tokens": self.tokens,
            "scored": self.scored,
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            "sequence_tokens": self.sequence_tokens,
            "examples": self.examples,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.tokens = state["tokens"]
        self.scored = state["scored"]
        self.train_seconds = state["train_seconds"]
        self.train_cpu_seconds = state.get("train_cpu_seconds", 0.0)
        self.sequence_tokens = state["sequence_tokens"]
        self.examples = state["examples"]


def evaluate_loss(module, examples, s: Settings, pad_id: int, d: dd.Dist, autocast) -> float:
    """Mean held-out loss per response token, over all processes."""
    import torch

    module.eval()
    total = count = 0.0
    mine = examples[d.rank :: d.world_size]
    with torch.no_grad():
        for start in range(0, len(mine), s.batch_size):
            batch = ds.collate(mine[start : start + s.batch_size], pad_id)
            batch = {k: v.to(d.device) for k, v in batch.items()}
            with autocast():
                loss, n = module(**batch)
            total += float(loss)
            count += float(n)
    module.train()
    total, count = dd.all_sum(d, [total, count])
    return total / max(count, 1.0)


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one fine-tune described by ``spec`` (see ``runner.write_spec``); returns metrics."""
    import torch

    s = from_dict(spec["settings"])
    device = dd.choose_device(s.device, s.method)  # QLoRA without CUDA fails here, first
    if s.method == "qlora":
        dd.check_bitsandbytes()
    precision = choose_precision(s.precision, device)
    d = dd.init(device)
    if spec.get("threads") and device == "cpu":
        torch.set_num_threads(max(1, int(spec["threads"]) // max(1, s.gpus_per_node)))
    try:
        return _train(spec, s, device, precision, d)
    finally:
        dd.shutdown()


def _train(spec: dict, s: Settings, device: str, precision: str, d: dd.Dist) -> dict:
    import contextlib

    import torch
    from transformers import AutoTokenizer

    start_wall = time.perf_counter()
    log(
        f"finetune: {s.method} r={s.lora_r} on {d.world_size} process(es) "
        f"({s.nodes} node(s) x {s.gpus_per_node}), device {device}, precision {precision}, "
        f"strategy {s.strategy if d.enabled else 'single'}",
        d,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["base_hf"])
    own_template = ds.ensure_chat_template(tokenizer)
    pad_id = ds.pad_token_id(tokenizer)
    train_examples, dropped = ds.tokenize_all(tokenizer, ds.read_jsonl(spec["train"]), s.seq_len)
    heldout_all, dropped_heldout = ds.tokenize_all(
        tokenizer, ds.read_jsonl(spec["heldout"]), s.seq_len
    )
    if not train_examples:
        raise PipelineError(f"{spec['train']}: no example fits finetune.seq_len={s.seq_len}")
    heldout = heldout_all[: s.eval_examples] if s.eval_examples else heldout_all
    log(
        f"data: {len(train_examples)} training examples ({dropped} longer than seq_len "
        f"dropped), {len(heldout)} held-out for the loss curve",
        d,
    )

    global_batch = s.batch_size * s.grad_accum * d.world_size
    steps_per_epoch = math.ceil(len(train_examples) / global_batch)
    total_steps = s.max_steps or s.epochs * steps_per_epoch
    fp = ckpt.fingerprint(
        {
            "settings": {
                k: v
                for k, v in s.as_dict().items()
                if k not in ("log_every", "save_every", "keep_checkpoints")
            },
            "base": spec.get("base_fingerprint"),
            "data": [spec.get("train_sha256"), spec.get("heldout_sha256")],
            "world_size": d.world_size,
        }
    )

    peft_model = load_model(spec["base_hf"], s, device, precision, d)
    module = ResponseLoss.build(peft_model)
    model = dd.wrap(
        module, d, s.strategy, layers=decoder_layers(peft_model), fp16=precision == "fp16"
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=s.learning_rate, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s, total_steps))
    # fp16 needs a dynamic loss scale (the adapters and their gradients stay fp32).
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device == "cuda")

    def autocast():
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type="cuda", dtype=dtype)

    run = Run()
    first_step = 0
    found = ckpt.latest(spec["checkpoints"], fp)
    if found is not None:
        path, state = found
        extra = ckpt.load(path, model, optimizer, d)
        scheduler.load_state_dict(extra["scheduler"])
        if extra.get("scaler") is not None and scaler.is_enabled():
            scaler.load_state_dict(extra["scaler"])
        run.restore(state["run"])
        first_step = state["step"]
        log(f"resuming from {path} (step {first_step} of {total_steps})", d)
    else:
        log(f"no checkpoint to resume from in {spec['checkpoints']}: starting at step 0", d)

    def record(step: int, split: str, loss: float) -> None:
        run.history.append(
            {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "split": split,
                "loss": round(loss, 6),
                "tokens": run.tokens,
                "seconds": round(run.train_seconds, 3),
            }
        )

    if first_step == 0:
        loss0 = evaluate_loss(model, heldout, s, pad_id, d, autocast)
        record(0, "heldout", loss0)
        log(f"step 0: held-out loss {loss0:.4f}", d)

    model.train()
    for step in range(first_step, total_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        epoch, within = divmod(step, steps_per_epoch)
        order = ds.epoch_order(len(train_examples), s.seed, epoch)
        chunk = [order[(within * global_batch + i) % len(order)] for i in range(global_batch)]
        per_rank = s.batch_size * s.grad_accum
        mine = [train_examples[i] for i in chunk[d.rank * per_rank : (d.rank + 1) * per_rank]]
        micro = [mine[i : i + s.batch_size] for i in range(0, len(mine), s.batch_size)]
        global_scored, global_tokens, n_examples, square_tokens = dd.all_sum(
            d,
            [
                sum(e.n_labels for e in mine),
                sum(e.n_tokens for e in mine),
                len(mine),
                sum(e.n_tokens**2 for e in mine),  # for the attention FLOPs
            ],
        )
        loss_sum = 0.0
        for index, examples in enumerate(micro):
            batch = {k: v.to(d.device) for k, v in ds.collate(examples, pad_id).items()}
            last = index == len(micro) - 1
            with dd.grad_sync(model, last), autocast():
                loss, _ = model(**batch)
                # DDP and FSDP average gradients over processes: scale by the world size so
                # the result is the mean over every scored token of the global batch.
                scaled = loss * d.world_size / max(global_scored, 1.0)
            scaler.scale(scaled).backward()
            loss_sum += float(loss.detach())
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, s.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        (total_loss,) = dd.all_sum(d, [loss_sum])
        train_loss = total_loss / max(global_scored, 1.0)
        run.train_seconds += time.perf_counter() - t0
        run.train_cpu_seconds += time.process_time() - c0
        run.tokens += int(global_tokens)
        run.scored += int(global_scored)
        run.examples += int(n_examples)
        run.sequence_tokens += int(square_tokens)
        done = step + 1
        record(done, "train", train_loss)
        if done % s.log_every == 0 or done == total_steps or done == first_step + 1:
            log(
                f"step {done}/{total_steps}: loss {train_loss:.4f}, lr "
                f"{scheduler.get_last_lr()[0]:.2e}, grad norm {float(grad_norm):.3f}, "
                f"{run.tokens / max(run.train_seconds, 1e-9):.0f} tokens/s",
                d,
            )
        if done % s.eval_every == 0 or done == total_steps:
            heldout_loss = evaluate_loss(model, heldout, s, pad_id, d, autocast)
            record(done, "heldout", heldout_loss)
            log(f"step {done}: held-out loss {heldout_loss:.4f}", d)
        if done % s.save_every == 0 and done < total_steps:
            ckpt.save(
                spec["checkpoints"],
                done,
                {"fingerprint": fp, "run": run.state(), "total_steps": total_steps},
                model,
                optimizer,
                {
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                },
                d,
                s.keep_checkpoints,
            )
            log(f"step {done}: checkpoint saved", d)

    weights = ckpt.trainable_state(model, d)  # collective under FSDP
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    peak_rss_max, peak_gpu_max = dd.all_max(d, [peak_rss_mb, peak_gpu_mb])
    (peak_rss_sum,) = dd.all_sum(d, [peak_rss_mb])
    metrics = None
    if d.is_main:
        save_adapter(peft_model, weights, spec["adapter"], tokenizer, own_template)
        write_loss_csv(spec["loss_csv"], run.history)
        facts = {
            "model": spec.get("model_id"),
            "base": spec["base_hf"],
            "method": s.method,
            "settings": s.as_dict(),
            "device": device,
            "precision": precision,
            "processes": d.world_size,
            "strategy": s.strategy if d.enabled else "single",
            "steps": total_steps,
            "resumed_from_step": first_step or None,
            "examples_dropped": {"train": dropped, "heldout": dropped_heldout},
            "peak_rss_mb": round(peak_rss_max, 1),
            "peak_rss_mb_all_processes": round(peak_rss_sum, 1),
            "peak_gpu_mem_mb": round(peak_gpu_max, 1) if device == "cuda" else None,
            "wall_seconds": round(time.perf_counter() - start_wall, 3),
        }
        metrics = build_metrics(facts, spec["base_hf"], s, run, n_lora)
        atomic.write_json(spec["metrics"], metrics)
        log(
            f"done: {run.tokens} tokens in {run.train_seconds:.1f} s "
            f"({metrics['tokens_per_s']:.0f} tokens/s), peak RSS {peak_rss_max:.0f} MiB",
            d,
        )
    dd.barrier(d)
    return metrics or {}


def save_adapter(peft_model, weights: dict, out_dir: str, tokenizer, own_template: bool) -> None:
    """The adapter in PEFT's format (``PeftModel.from_pretrained`` loads it), atomically."""
    prefix = "peft."
    state = {k.removeprefix(prefix): v for k, v in weights.items()}
    with atomic.atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if not own_template:  # the merged model and the GGUF get the template trained with
            tokenizer.save_pretrained(tmp)


def write_loss_csv(path: str, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOSS_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic.write_text(path, buf.getvalue())


def build_metrics(facts: dict, base_hf: str, s: Settings, run: Run, n_lora: int) -> dict:
    """The run's figures: throughput, memory (in ``facts``), FLOPs, losses, provenance."""
    from llmpipe.estimate import ModelShape
    from llmpipe.finetune import flops

    shape = ModelShape.from_config(Path(base_hf) / "config.json")
    counts = flops.FlopCounts.of(shape, n_lora)
    mean_seq = run.sequence_tokens / max(run.tokens, 1)  # token-weighted sequence length
    lora = flops.lora_flops(counts, run.tokens, run.scored, mean_seq, s.gradient_checkpointing)
    full = flops.full_flops(counts, run.tokens, mean_seq)
    heldout = [h for h in run.history if h["split"] == "heldout"]
    train_losses = [h for h in run.history if h["split"] == "train"]
    return {
        **facts,
        "examples_seen": run.examples,
        "tokens": run.tokens,
        "scored_tokens": run.scored,
        "train_seconds": round(run.train_seconds, 3),
        "tokens_per_s": round(run.tokens / max(run.train_seconds, 1e-9), 2),
        # CPU time of process 0 only (a shared machine's load barely changes it):
        "train_cpu_seconds": round(run.train_cpu_seconds, 3),
        "tokens_per_cpu_s": round(
            run.tokens / facts["processes"] / max(run.train_cpu_seconds, 1e-9), 2
        ),
        "trainable_params": n_lora,
        "base_params": shape.n_params,
        "flops": {
            "total": lora,
            "per_token": lora / max(run.tokens, 1),
            "full_finetune_equivalent": full,
            "lora_over_full": round(lora / full, 4) if full else None,
            "achieved_per_s": lora / max(run.train_seconds, 1e-9),
            "formula": "llmpipe.finetune.flops (LoRA: 4 N_body + 6 N_lora per token, "
            "4 N_head per scored token, + attention; full: 6 N per token)",
            "n_body": counts.body,
            "n_head": counts.head,
            "n_lora": counts.lora,
            "mean_sequence_tokens": round(mean_seq, 2),
        },
        "loss": {
            "heldout_first": heldout[0]["loss"] if heldout else None,
            "heldout_last": heldout[-1]["loss"] if heldout else None,
            "train_first": train_losses[0]["loss"] if train_losses else None,
            "train_last": train_losses[-1]["loss"] if train_losses else None,
        },
        "provenance": provenance.collect(seed=s.seed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.finetune.train",
        description="LoRA/QLoRA fine-tuning of one model (one process, or one of torchrun's)",
    )
    parser.add_argument("--spec", required=True, help="JSON file written by llmpipe.finetune")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    try:
        train(spec)
    except PipelineError as err:
        rank = os.environ.get("RANK", "0")
        print(f"finetune (rank {rank}): error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
