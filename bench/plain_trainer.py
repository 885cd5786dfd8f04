"""The baseline of bench_finetune.py: a plain PEFT + transformers Trainer LoRA script.

What one would write from the PEFT and transformers docs: the same model, LoRA config, data
(the same chat-template rendering with the prompt masked, via llmpipe.finetune.dataset) and
hyper-parameters as our finetune step, ``DataCollatorForSeq2Seq`` for dynamic padding, no
evaluation, no checkpoints. Prints one JSON line: tokens/s over ``trainer.train()`` and the
process's peak RSS (the kernel's high-water mark).

    python bench/plain_trainer.py SPEC.json     (the spec our training reads)
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main(spec_path: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from llmpipe.finetune import dataset as ds
    from llmpipe.finetune.settings import from_dict, target_modules

    spec = json.loads(Path(spec_path).read_text())
    s = from_dict(spec["settings"])
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(spec["base_hf"])
    examples, _ = ds.tokenize_all(tokenizer, ds.read_jsonl(spec["train"]), s.seq_len)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    tokens = sum(e.n_tokens for e in examples)

    model = AutoModelForCausalLM.from_pretrained(spec["base_hf"], dtype=torch.float32)
    lora = LoraConfig(
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=target_modules(s, model.config.model_type),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(Path(spec["checkpoints"]) / "trainer"),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        max_steps=s.max_steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        gradient_checkpointing=s.gradient_checkpointing,
        seed=s.seed,
        logging_steps=s.log_every,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        json.dumps(
            {
                "tokens": tokens,
                "train_seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "train_cpu_seconds": cpu,
                "tokens_per_cpu_s": tokens / cpu,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
