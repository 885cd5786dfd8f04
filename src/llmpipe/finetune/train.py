"""The training process: ``python -m llmpipe.finetune.train --spec spec.json`` (or torchrun).

transformers' ``Trainer`` with PEFT does the training, for every placement: one CPU process, one
GPU, DDP over GPUs (or CPU processes, gloo) or FSDP, under torchrun (``launch``). What is ours:

1. fail fast: QLoRA without CUDA, bitsandbytes missing, bf16 on a GPU without it (V100);
2. the data: the train and held-out splits tokenised with the model's chat template, the loss
   on the response tokens only (``dataset``);
3. the model: frozen base in fp16 on a GPU (fp32 on the CPU), or 4/8-bit through bitsandbytes
   for QLoRA (``BitsAndBytesConfig``, fp16 compute), LoRA adapters from PEFT (fp32);
4. ``ResponseTrainer.compute_loss``: the mean over the global batch's response tokens (exact
   however they fall into micro-batches and processes: Trainer's ``num_items_in_batch``), with
   the output head applied only to the positions from the batch's first scored one on
   (``logits_to_keep``, through the model's own forward, so DDP/FSDP hooks run as usual). On
   the default run's data ~80 % of the tokens are prompt: their vocab-sized logits (the largest
   activation of a small model) are never formed;
5. held-out loss per response token before the first step, every ``eval_every`` steps and at
   the end (``ResponseTrainer.evaluate``, on Trainer's schedule);
6. Trainer's own checkpoints every ``save_every`` steps (``checkpoint-<step>``, the newest
   ``keep_checkpoints`` kept); each gets a ``llmpipe.json`` with the run's fingerprint once
   Trainer has written it, and a rerun resumes (``resume_from_checkpoint``) from the newest
   complete one with the same fingerprint; others are removed;
7. at the end the adapter (PEFT format), the loss curve (CSV, from Trainer's log history) and
   the metrics: tokens/s over the training steps only, peak memory, FLOPs, provenance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from llmpipe import atomic
from llmpipe.errors import PipelineError, ResourceError
from llmpipe.finetune import dataset as ds
from llmpipe.finetune.checkpoints import MARKER, checkpoint_step, fingerprint, resumable
from llmpipe.finetune.outputs import build_metrics, loss_rows, write_loss_csv
from llmpipe.finetune.settings import Settings, from_dict, target_modules

COUNTS = ("tokens", "scored_tokens", "square_tokens")  # totals in every log entry


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Fail fast
# --------------------------------------------------------------------------------------------


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_device(device: str, method: str) -> str:
    """'cuda' or 'cpu' for the settings' ``device`` (auto = CUDA when present); QLoRA and an
    explicit 'cuda' fail fast, before any model is loaded, where there is no CUDA."""
    has_cuda = cuda_available()
    if method == "qlora" and not has_cuda:
        raise ResourceError(
            "finetune.method: qlora needs a CUDA GPU (bitsandbytes 4-bit/8-bit kernels), and "
            "this machine has none (torch.cuda.is_available() is False); use method: lora "
            "here, or run on a GPU node"
        )
    if device == "cuda" and not has_cuda:
        raise ResourceError(
            "finetune.device: cuda, but torch.cuda.is_available() is False on this machine "
            "(no GPU, no driver, or a CPU-only torch build); use device: auto or cpu"
        )
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


def check_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ResourceError(
            "finetune.method: qlora needs the bitsandbytes package (the qlora extra: "
            "LLMPIPE_QLORA=1 tools/setup.sh, in the workflow's environment on the GPU nodes)"
        ) from err


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


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def load_model(base_hf: str, s: Settings, device: str, precision: str):
    """The base model with LoRA adapters (PEFT), on this process's device (QLoRA: loaded there
    by bitsandbytes; otherwise Trainer moves it)."""
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
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base_hf, **kwargs)
    model.config.use_cache = False
    if s.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=s.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    torch.manual_seed(s.seed)  # the same adapter initialisation on every process
    lora = LoraConfig(
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=target_modules(s, getattr(model.config, "model_type", None)),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, lora)  # adapters in fp32 (autocast_adapter_dtype)


def decoder_layer_classes(peft_model) -> list[str]:
    """The repeated blocks' class names (FSDP wraps each one)."""
    decoder = peft_model.get_base_model().get_decoder()
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if blocks is not None and len(blocks):
            return [type(blocks[0]).__name__]
    return []


# --------------------------------------------------------------------------------------------
# Checkpoints: Trainer's, marked complete with the run's fingerprint
# --------------------------------------------------------------------------------------------


def _callbacks(fp: str, total_steps: int, log_every: int):
    """Trainer callbacks: the checkpoint marker, the last step's evaluation and no save there,
    the time of the training steps (evaluation and saving excluded) and the console log."""
    import torch
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def __init__(self):
            self.seconds = 0.0
            self.cpu_seconds = 0.0
            self._t0 = self._c0 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            done = [h for h in state.log_history if "train_seconds" in h]
            if done:  # resumed: the time already spent
                self.seconds = done[-1]["train_seconds"]
                self.cpu_seconds = done[-1].get("train_cpu_seconds", 0.0)

        def on_step_begin(self, args, state, control, **kw):
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self._t0
            self.cpu_seconds += time.process_time() - self._c0
            if state.global_step >= total_steps:
                control.should_evaluate = True  # the end of the curve
                control.should_save = False  # the adapter is the result, not a checkpoint

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                atomic.write_json(folder / MARKER, {"fingerprint": fp, "step": state.global_step})

        def on_log(self, args, state, control, logs=None, **kw):
            step = state.global_step
            if logs and "loss" in logs and (step % log_every == 0 or step == total_steps):
                log(
                    f"step {step}/{total_steps}: loss {logs['loss']:.4f}, lr "
                    f"{logs.get('learning_rate', 0):.2e}, grad norm {logs.get('grad_norm', 0):.3f}"
                    f", {logs.get('tokens', 0) / max(self.seconds, 1e-9):.0f} tokens/s"
                )
            if logs and "eval_loss" in logs:
                log(f"step {step}: held-out loss {logs['eval_loss']:.4f}")

    return Steps()


# --------------------------------------------------------------------------------------------
# The trainer: loss on response tokens, head at the scored positions only
# --------------------------------------------------------------------------------------------


def make_trainer(model, args, train_examples, heldout, pad_id: int, steps_cb, fsdp: bool):
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    def collate(examples):
        return ds.collate(examples, pad_id)

    class ResponseTrainer(Trainer):
        # compute_loss divides by the global batch's scored tokens itself.
        loss_is_scaled_for_ga = True

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.model_accepts_loss_kwargs = True  # so Trainer counts num_items_in_batch
            # This process's non-padding tokens, scored tokens and sum of squared lengths
            # (attention FLOPs) since this run started; the log adds a resumed run's totals.
            self.counts = dict.fromkeys(COUNTS, 0.0)
            self.history_base: dict[str, float] = {}

        def response_loss(self, model, inputs):
            """(sum of the response tokens' losses, their count) of one batch."""
            labels = inputs["labels"]
            target = labels[:, 1:]
            scored = target != ds.IGNORE
            cols = scored.any(dim=0).nonzero()
            first = int(cols[0]) if len(cols) else target.shape[1] - 1
            # Logits only from the first scored position on (prompts come first in every row):
            # positions first .. width-2 predict the targets first .. width-2 (shifted).
            width = labels.shape[1]
            out = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
                logits_to_keep=width - first,
            )
            logits = out.logits[:, :-1]
            kept_target, kept = target[:, first:], scored[:, first:]
            loss = F.cross_entropy(logits[kept].float(), kept_target[kept], reduction="sum")
            return loss, kept.sum()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, count = self.response_loss(model, inputs)
            if model.training:
                lengths = inputs["attention_mask"].sum(dim=1)
                self.counts["tokens"] += float(lengths.sum())
                self.counts["scored_tokens"] += float(count)
                self.counts["square_tokens"] += float((lengths**2).sum())
            if num_items_in_batch is None:
                loss = loss / count.clamp(min=1)
            else:
                # DDP and FSDP average gradients over processes: times the world size, the
                # result is the mean over every scored token of the global batch.
                loss = loss / num_items_in_batch * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """Mean held-out loss per response token, over all processes."""
            model = self.model_wrapped if fsdp else self.model
            rank, world = self.args.process_index, self.args.world_size
            mine = heldout if fsdp else heldout[rank::world]  # FSDP: every rank runs each pass
            total = torch.zeros(2, dtype=torch.float64, device=self.args.device)
            was_training = model.training
            model.eval()
            with torch.no_grad(), self.accelerator.autocast():
                for start in range(0, len(mine), self.args.per_device_eval_batch_size):
                    batch = collate(mine[start : start + self.args.per_device_eval_batch_size])
                    batch = {k: v.to(self.args.device) for k, v in batch.items()}
                    loss, count = self.response_loss(model, batch)
                    total += torch.stack([loss.double(), count.double()])
            if world > 1 and not fsdp:
                torch.distributed.all_reduce(total)
            model.train(was_training)
            metrics = {f"{metric_key_prefix}_loss": float(total[0] / total[1].clamp(min=1))}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, metrics
            )
            return metrics

        def log(self, logs, start_time=None):
            """Every entry of the loss curve carries the totals so far (all processes)."""
            counts = torch.tensor(
                [self.counts[k] for k in COUNTS], dtype=torch.float64, device=self.args.device
            )
            if self.args.world_size > 1:
                torch.distributed.all_reduce(counts)
            if not self.history_base:
                done = [h for h in self.state.log_history if "scored_tokens" in h]
                self.history_base = {k: done[-1][k] if done else 0 for k in COUNTS}
            logs = {
                **logs,
                **{
                    k: int(self.history_base[k] + v)
                    for k, v in zip(COUNTS, counts.tolist(), strict=True)
                },
                "train_seconds": round(steps_cb.seconds, 3),
                "train_cpu_seconds": round(steps_cb.cpu_seconds, 3),
            }
            super().log(logs, start_time)

    from transformers.trainer_callback import PrinterCallback

    trainer = ResponseTrainer(
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=heldout,  # evaluated by ``evaluate`` above, on Trainer's schedule
        data_collator=collate,
        callbacks=[steps_cb],
    )
    trainer.remove_callback(PrinterCallback)  # a dict per step; ours logs every log_every
    return trainer


def training_arguments(s: Settings, out_dir: str, device: str, precision: str, total: int, layers):
    from transformers import TrainingArguments

    scheduler = s.lr_scheduler
    if scheduler == "constant" and s.warmup_steps:
        scheduler = "constant_with_warmup"
    fsdp = {}
    if s.strategy == "fsdp" and s.total_processes > 1:
        fsdp = {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": layers},
        }
    return _arguments(
        TrainingArguments,
        output_dir=out_dir,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        max_steps=total,
        learning_rate=s.learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        optim="adamw_torch",
        activation_checkpointing=s.gradient_checkpointing and s.method != "qlora",
        activation_checkpointing_kwargs={"use_reentrant": False},
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        seed=s.seed,
        data_seed=s.seed,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=s.eval_every,
        save_strategy="steps",
        save_steps=s.save_every,
        save_total_limit=s.keep_checkpoints,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        ddp_find_unused_parameters=False,
        report_to=[],
        disable_tqdm=True,
        log_level="warning",
        **fsdp,
    )


def _arguments(cls, **kwargs):
    """``TrainingArguments`` on this transformers (the GPU check runs on a machine's own):
    releases before ``activation_checkpointing`` call it ``gradient_checkpointing``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    for new, old in (
        ("activation_checkpointing", "gradient_checkpointing"),
        ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"),
    ):
        if new not in names and new in kwargs:
            kwargs[old] = kwargs.pop(new)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one fine-tune described by ``spec`` (see ``runner.write_spec``); returns metrics."""
    import torch

    s = from_dict(spec["settings"])
    device = choose_device(s.device, s.method)  # QLoRA without CUDA fails here, first
    if s.method == "qlora":
        check_bitsandbytes()
    precision = choose_precision(s.precision, device)
    if spec.get("threads") and device == "cpu":
        torch.set_num_threads(max(1, int(spec["threads"]) // max(1, s.gpus_per_node)))
    return _train(spec, s, device, precision)


def _train(spec: dict, s: Settings, device: str, precision: str) -> dict:
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    start_wall = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = s.strategy if world > 1 else "single"
    log(
        f"finetune: {s.method} r={s.lora_r} on {world} process(es) ({s.nodes} node(s) x "
        f"{s.gpus_per_node}), device {device}, precision {precision}, strategy {strategy}"
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
        f"dropped), {len(heldout)} held-out for the loss curve"
    )
    global_batch = s.batch_size * s.grad_accum * world
    steps_per_epoch = math.ceil(len(train_examples) / global_batch)
    total_steps = s.max_steps or s.epochs * steps_per_epoch
    fp = fingerprint(
        {
            "settings": {
                k: v
                for k, v in s.as_dict().items()
                if k not in ("log_every", "save_every", "keep_checkpoints")
            },
            "base": spec.get("base_fingerprint"),
            "data": [spec.get("train_sha256"), spec.get("heldout_sha256")],
            "world_size": world,
        }
    )
    peft_model = load_model(spec["base_hf"], s, device, precision)
    n_lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    args = training_arguments(
        s, spec["checkpoints"], device, precision, total_steps, decoder_layer_classes(peft_model)
    )
    steps = _callbacks(fp, total_steps, s.log_every)
    trainer = make_trainer(
        peft_model, args, train_examples, heldout, pad_id, steps, fsdp="fsdp" in strategy
    )
    resume = resumable(spec["checkpoints"], fp)
    trainer.accelerator.wait_for_everyone()  # every rank has chosen before any is removed
    if trainer.is_world_process_zero():
        resumable(spec["checkpoints"], fp, prune=True)
    if resume is None:
        log(f"no checkpoint to resume from in {spec['checkpoints']}: starting at step 0")
        trainer.args.eval_on_start = True  # the curve's step 0 (a resumed run has it)
    else:
        log(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if world > 1:  # what accelerate actually did
        strategy = "fsdp" if trainer.is_fsdp_enabled else "ddp"
    first_step = checkpoint_step(resume) if resume else 0

    state = _adapter_state(trainer, strategy)  # collective under FSDP
    peaks = torch.tensor(
        [
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0,
        ],
        dtype=torch.float64,
        device=trainer.args.device,
    )
    rss_sum = peaks[0].clone()
    if world > 1:
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(rss_sum)
    metrics: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        save_adapter(peft_model, state, spec["adapter"], tokenizer, own_template)
        write_loss_csv(spec["loss_csv"], loss_rows(history, steps_per_epoch))
        facts = {
            "model": spec.get("model_id"),
            "base": spec["base_hf"],
            "method": s.method,
            "settings": s.as_dict(),
            "device": device,
            "precision": precision,
            "processes": world,
            "strategy": strategy,
            "trainer": "transformers.Trainer + peft",
            "steps": total_steps,
            "resumed_from_step": first_step or None,
            "examples_dropped": {"train": dropped, "heldout": dropped_heldout},
            "peak_rss_mb": round(float(peaks[0]), 1),
            "peak_rss_mb_all_processes": round(float(rss_sum), 1),
            "peak_gpu_mem_mb": round(float(peaks[1]), 1) if device == "cuda" else None,
            "wall_seconds": round(time.perf_counter() - start_wall, 3),
        }
        metrics = build_metrics(facts, spec["base_hf"], s, history, n_lora)
        atomic.write_json(spec["metrics"], metrics)
        log(
            f"done: {metrics['tokens']} tokens in {metrics['train_seconds']:.1f} s "
            f"({metrics['tokens_per_s']:.0f} tokens/s), peak RSS {facts['peak_rss_mb']:.0f} MiB"
        )
    trainer.accelerator.wait_for_everyone()
    return metrics


def _adapter_state(trainer, strategy: str) -> dict | None:
    """The full state dict under FSDP (gathered on every rank); None otherwise (PEFT reads
    the adapter from the model itself)."""
    if "fsdp" not in strategy:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def save_adapter(peft_model, state: dict | None, out_dir: str, tokenizer, own_template) -> None:
    """The adapter in PEFT's format (``PeftModel.from_pretrained`` loads it), atomically."""
    with atomic.atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if not own_template:  # the merged model and the GGUF get the template trained with
            tokenizer.save_pretrained(tmp)


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
