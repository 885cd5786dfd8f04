"""The config's ``finetune:`` section: which models are tuned, and each one's settings.

::

    finetune:
      enabled_for: [smollm2]          # each becomes a model of its own: "smollm2-ft"
      defaults: {learning_rate: ...}  # every key below, for every tuned model
      models:
        smollm2: {max_steps: 30}      # per-model overrides of defaults

``Settings`` is a typed view of one model's keys; their types, choices, ranges and defaults are
the schema's (workflow/schemas/config.schema.yaml, ``finetune.defaults``), checked by
``llmpipe.config.validate``. The rules pass each step only the keys it uses (``Settings.group``),
so changing, say, the comparison's batch size reruns the comparison, not the training.

Imported by the Snakefile: no heavy imports (standard library, and llmpipe.config for the
schema).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmpipe import config as cfg
from llmpipe.constants import tokens_bound
from llmpipe.errors import ConfigError

SUFFIX = "-ft"

# LoRA target modules when ``target_modules`` is null, by config.json ``model_type``: attention
# and MLP projections of Llama-like decoders; Falcon's fused attention and its dense layers.
# Anything else gets PEFT's "all-linear" (every linear layer but the output head).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FALCON_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": LLAMA_TARGETS,
    "mistral": LLAMA_TARGETS,
    "qwen2": LLAMA_TARGETS,
    "qwen3": LLAMA_TARGETS,
    "gemma": LLAMA_TARGETS,
    "gemma2": LLAMA_TARGETS,
    "falcon": FALCON_TARGETS,
    "RefinedWeb": FALCON_TARGETS,
    "RefinedWebModel": FALCON_TARGETS,
}

# Which step uses a key: data (finetune_data), train (finetune), merge (merge_lora and
# lora_to_gguf), compare (compare_finetune).
DATA, TRAIN, MERGE, COMPARE = "data", "train", "merge", "compare"

_SCHEMA_DEFAULTS = cfg.defaults("finetune.defaults")


def _key(name: str, *groups: str) -> Any:
    """Field ``name``: its default from the schema; ``groups`` are the steps that use it."""
    default = _SCHEMA_DEFAULTS[name]
    meta = {"groups": groups}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """One tuned model's settings: a typed view of a validated ``finetune.defaults`` mapping.

    Types, choices, ranges and defaults are the schema's (``finetune.defaults`` in
    workflow/schemas/config.schema.yaml; explained in config/README.md); this class checks none of
    them again. Build it from a validated config (``resolve``) or a mapping from one
    (``from_dict``).
    """

    # --- the adapter
    method: str = _key("method", TRAIN)
    qlora_quant: str = _key("qlora_quant", TRAIN)
    lora_r: int = _key("lora_r", TRAIN)
    lora_alpha: float = _key("lora_alpha", TRAIN)
    lora_dropout: float = _key("lora_dropout", TRAIN)
    target_modules: list[str] | str | None = _key("target_modules", TRAIN)
    # --- optimisation
    learning_rate: float = _key("learning_rate", TRAIN)
    lr_scheduler: str = _key("lr_scheduler", TRAIN)
    warmup_steps: int = _key("warmup_steps", TRAIN)
    weight_decay: float = _key("weight_decay", TRAIN)
    max_grad_norm: float = _key("max_grad_norm", TRAIN)
    epochs: int = _key("epochs", TRAIN)
    max_steps: int | None = _key("max_steps", TRAIN)
    batch_size: int = _key("batch_size", TRAIN)
    grad_accum: int = _key("grad_accum", TRAIN)
    seq_len: int = _key("seq_len", TRAIN, DATA)
    gradient_checkpointing: bool = _key("gradient_checkpointing", TRAIN)
    seed: int = _key("seed", TRAIN)
    precision: str = _key("precision", TRAIN)
    device: str = _key("device", TRAIN, COMPARE)
    # --- placement
    nodes: int = _key("nodes", TRAIN)
    gpus_per_node: int = _key("gpus_per_node", TRAIN)
    strategy: str = _key("strategy", TRAIN)
    rdzv_port: int = _key("rdzv_port", TRAIN)
    # --- bookkeeping
    log_every: int = _key("log_every", TRAIN)
    eval_every: int = _key("eval_every", TRAIN)
    eval_examples: int | None = _key("eval_examples", TRAIN)
    save_every: int = _key("save_every", TRAIN)
    keep_checkpoints: int = _key("keep_checkpoints", TRAIN)
    # --- data
    train_file: str | None = _key("train_file", DATA)
    heldout_file: str | None = _key("heldout_file", DATA)
    heldout_fraction: float = _key("heldout_fraction", DATA)
    task: str = _key("task", DATA)
    task_train_examples: int = _key("task_train_examples", DATA)
    task_heldout_examples: int = _key("task_heldout_examples", DATA)
    data_seed: int = _key("data_seed", DATA)
    # --- outputs
    merged_dtype: str = _key("merged_dtype", MERGE)
    adapter_gguf: bool = _key("adapter_gguf", MERGE)
    compare_examples: int | None = _key("compare_examples", COMPARE)
    compare_batch_size: int = _key("compare_batch_size", COMPARE)

    def group(self, name: str) -> dict[str, Any]:
        """The keys one step uses, as a plain dict (a rule's ``params``)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if name in f.metadata["groups"]
        }

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def total_processes(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def wants_cuda(self) -> bool:
        """Whether the job must be placed on GPUs (QLoRA always needs one)."""
        return self.device == "cuda" or self.method == "qlora"


def from_dict(values: Mapping[str, Any]) -> Settings:
    """The view of a (partial) mapping of validated settings, e.g. a rule's ``params`` made by
    ``Settings.group``; keys it leaves out take the schema's defaults."""
    return Settings(**values)


def _check_combination(s: Settings, where: str) -> None:
    """The rules between keys that the schema cannot express; the error names the key."""
    if s.strategy == "fsdp" and s.method == "qlora":
        raise ConfigError(
            f"{where}.strategy: fsdp with method qlora is not supported (bitsandbytes weights "
            f"cannot be sharded here); use strategy ddp, or method lora with fsdp"
        )
    if s.method == "qlora" and s.device == "cpu":
        raise ConfigError(
            f"{where}.method: qlora needs a CUDA GPU (bitsandbytes kernels), but device is "
            f"'cpu'; use method lora on the CPU"
        )
    if s.precision in ("fp16", "bf16") and s.device == "cpu":
        raise ConfigError(
            f"{where}.precision: {s.precision} mixed precision needs a GPU; on device 'cpu' "
            f"use fp32 (or auto)"
        )
    if s.train_file is None and s.heldout_file is not None:
        raise ConfigError(f"{where}.heldout_file: set, but train_file is null (set both)")


# --------------------------------------------------------------------------------------------
# The model table
# --------------------------------------------------------------------------------------------


def section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("finetune") or {}


def base_models(config: Mapping[str, Any]) -> list[str]:
    """Base models to fine-tune, in the order ``finetune.enabled_for`` lists them."""
    return list(section(config).get("enabled_for") or [])


def tuned_id(base: str) -> str:
    return f"{base}{SUFFIX}"


def tuned_models(config: Mapping[str, Any]) -> list[str]:
    return [tuned_id(m) for m in base_models(config)]


def resolve(config: Mapping[str, Any], base: str) -> Settings:
    """The settings of base model ``base`` in a validated config: schema defaults <
    finetune.defaults < finetune.models.<base>."""
    sec = section(config)
    merged = {**(sec.get("defaults") or {}), **((sec.get("models") or {}).get(base) or {})}
    settings = from_dict(merged)
    _check_combination(settings, f"finetune.models.{base}")
    return settings


def check(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the finetune section of a validated config."""
    sec = section(config)
    models = list(config["models"])
    enabled = base_models(config)
    for base in enabled:
        if base not in models:
            raise ConfigError(
                f"finetune.enabled_for: '{base}' is not a model id (expected one of: "
                f"{', '.join(models)})"
            )
        if tuned_id(base) in models:
            raise ConfigError(
                f"finetune.enabled_for: '{base}' would create the model '{tuned_id(base)}', "
                f"which models: already defines; rename that model"
            )
    for base in sec.get("models") or {}:
        if base not in enabled:
            raise ConfigError(
                f"finetune.models.{base}: settings for a model that finetune.enabled_for does "
                f"not list (add it there, or remove these settings)"
            )
    _check_combination(from_dict(sec.get("defaults") or {}), "finetune.defaults")
    for base in enabled:
        resolve(config, base)


def id_regex(ids: Iterable[str]) -> str:
    """A wildcard constraint matching exactly ``ids`` (matches nothing when empty)."""
    ids = list(ids)
    return "|".join(map(re.escape, ids)) if ids else "(?!)"


# --------------------------------------------------------------------------------------------
# Model-dependent defaults
# --------------------------------------------------------------------------------------------


def target_modules(settings: Settings, model_type: str | None) -> list[str] | str:
    """The modules LoRA adapts: the configured list, or the architecture's default."""
    if settings.target_modules is not None:
        return settings.target_modules
    return list(DEFAULT_TARGETS.get(model_type or "", ())) or "all-linear"


def estimate_options(
    settings: Mapping[str, Any], train_examples: int, longest_tokens: int | None = None
) -> dict[str, Any]:
    """Options of ``llmpipe.estimate.finetune`` (through ``llmpipe.resources``) for one job.

    Batches are padded to their longest example, so sequences are ``longest_tokens`` (when
    known: ``DataSize.tokens``) capped at ``seq_len``."""
    s = from_dict(settings) if not isinstance(settings, Settings) else settings
    on_gpu = s.wants_cuda
    global_batch = s.batch_size * s.grad_accum * s.total_processes
    steps = s.max_steps or s.epochs * max(1, -(-train_examples // global_batch))
    dtype = {"auto": "f16", "fp16": "f16", "bf16": "bf16", "fp32": "f32"}[s.precision]
    if not on_gpu:
        dtype = "f32"
    return {
        "method": s.method,
        "hw": "gpu" if on_gpu else "cpu",
        "dtype": dtype,
        "quant": s.qlora_quant,
        "micro_batch": s.batch_size,
        "seq_len": min(s.seq_len, longest_tokens) if longest_tokens else s.seq_len,
        "lora_rank": s.lora_r,
        "steps": steps,
        "grad_accum": s.grad_accum,
        "gradient_checkpointing": s.gradient_checkpointing,
    }


# Tokens a chat template adds around one exchange (SmolLM2's, with its default system prompt,
# adds 30; Llama-2's [INST] markers fewer): an upper bound for planning.
TEMPLATE_TOKENS = 64


@dataclass(frozen=True)
class DataSize:
    """What planning needs of a JSONL split before any tokenizer is loaded: its records and
    its longest instruction and response in UTF-8 bytes (token bounds: ``tokens_bound``)."""

    examples: int
    prompt_bytes: int
    response_bytes: int

    @classmethod
    def of(cls, path: str) -> DataSize | None:
        """The split's size, or None when it cannot be read yet (a dry run). Read once per
        file version: the planner asks for every resource of every job."""
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return _data_size(str(path), stat.st_mtime_ns, stat.st_size)

    @property
    def prompt_tokens(self) -> int:
        return tokens_bound(self.prompt_bytes) + TEMPLATE_TOKENS

    @property
    def response_tokens(self) -> int:
        return tokens_bound(self.response_bytes) + 1  # + the end of turn

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens


@functools.lru_cache(maxsize=64)
def _data_size(path: str, mtime_ns: int, size: int) -> DataSize | None:
    examples, prompt, response = 0, 0, 0
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    examples += 1
                    prompt = max(prompt, len(r["instruction"].encode()))
                    response = max(response, len(r["response"].encode()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return DataSize(examples, prompt, response)


def plan_options(settings: Mapping[str, Any], train: str) -> dict[str, Any]:
    """``estimate_options`` from the training split itself (its records and longest one)."""
    s = from_dict(settings) if not isinstance(settings, Settings) else settings
    size = DataSize.of(train)
    if size is None:
        return estimate_options(s, s.task_train_examples)
    return estimate_options(s, size.examples, size.tokens)


def compare_estimate_options(settings: Mapping[str, Any], heldout: str) -> dict[str, Any]:
    """Options of ``llmpipe.estimate.evaluate_transformers`` for compare_finetune: each model
    (one at a time) generates answers to the held-out examples in batches, then scores every
    example in one forward pass: logits of every position, log-likelihood of the response's."""
    s = from_dict(settings) if not isinstance(settings, Settings) else settings
    on_gpu = s.device == "cuda"
    size = DataSize.of(heldout) or DataSize(s.task_heldout_examples, 256, 64)
    examples = min(size.examples, s.compare_examples or size.examples)
    return {
        "hw": "gpu" if on_gpu else "cpu",
        "dtype": "f16" if on_gpu else "f32",
        "batch": max(1, min(s.compare_batch_size, examples)),
        "seq_len": size.tokens,
        "new_tokens": size.response_tokens + 8,  # as compare: the longest answer + 8
        "samples": 2 * max(1, examples),  # base, then tuned
        "full_logits": True,
        "scored_tokens": size.response_tokens,  # as compare: the response's positions only
    }
