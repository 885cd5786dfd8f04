"""Fine-tuning: LoRA / QLoRA with PEFT on transformers, one to many GPUs, one to many nodes.

A fine-tuned model is a model of its own (``<base>-ft``): its merged weights re-enter the chain
(convert_to_gguf -> quantize -> evaluate) like any downloaded model. The modules, by role:

- ``settings``     the config's ``finetune:`` section: per-model settings, the tuned model ids,
                   the default LoRA target modules per architecture (no heavy imports)
- ``launch``       the command that starts training: one process, ``torchrun`` on one node, or
                   ``srun … torchrun --rdzv_backend c10d`` across the nodes of a Slurm allocation
- ``tasks``        the built-in, seeded instruction task (the default run's data set)
- ``dataset``      JSONL instruction/response pairs: checks, splits, chat-template rendering,
                   tokenisation with the loss on the response only, batching
- ``train``        one training process (``python -m llmpipe.finetune.train``): transformers'
                   ``Trainer`` + PEFT (DDP/FSDP through accelerate under torchrun), the loss
                   on response tokens with the head at scored positions only, Trainer's
                   checkpoints and resume, the loss curve and metrics from callbacks
- ``flops``        the FLOPs of LoRA and full fine-tuning per token (documented formulas)
- ``merge``        the adapter merged into the base: an HF folder + manifest; adapter -> GGUF
- ``compare``      base vs tuned on the held-out set: exact-match accuracy and perplexity
- ``runner``       what the workflow's finetune rule calls: launch, wait, draw the loss curve
"""
