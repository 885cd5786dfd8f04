"""Instruction/response data: JSONL files, splits, chat-template rendering, tokenised batches.

A data file has one JSON object per line with a non-empty ``instruction`` and ``response``
(strings), optionally ``input`` (appended to the instruction after a blank line, as in Alpaca)
and ``system`` (a system message). Anything else on a line is kept but ignored.

Rendering uses the model's own chat template (``tokenizer.apply_chat_template``): the user turn
and the generation prompt form the prompt, the assistant turn the response. The loss is taken on
the response tokens only (the prompt's labels are -100). A tokenizer without a chat template gets
``FALLBACK_TEMPLATE`` (Alpaca-style), which is also saved with the merged model so that every
later step (GGUF, evaluation) prompts it the same way.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe import atomic
from llmpipe.errors import ConfigError, SourceError
from llmpipe.finetune import tasks

IGNORE = -100

FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a data file; a bad line raises SourceError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: data file does not exist (expected JSONL, one object a line)")
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            check_record(record, f"{path}:{number}")
            records.append(record)
    if not records:
        raise SourceError(f"{path}: no records (expected one JSON object per line)")
    return records


def check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object with instruction and response")
    for key in ("instruction", "response"):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise SourceError(f"{where}: '{key}' missing or empty (expected a non-empty string)")
    for key in ("input", "system"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise SourceError(f"{where}: '{key}' must be a string")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    atomic.write_text(
        path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    )


def prepare(
    settings: dict[str, Any], train_out: str | os.PathLike, heldout_out: str | os.PathLike
) -> dict[str, Any]:
    """Write the train and held-out splits of one tuned model (``Settings.group("data")``).

    The built-in task when ``train_file`` is null; else the user's file, split by
    ``heldout_fraction`` (seeded by ``data_seed``) unless a ``heldout_file`` is given.
    """
    if settings["train_file"] is None:
        train, heldout = tasks.generate(
            settings["task"],
            settings["task_train_examples"],
            settings["task_heldout_examples"],
            settings["data_seed"],
        )
        origin = {"task": settings["task"], "seed": settings["data_seed"]}
    else:
        train = read_jsonl(settings["train_file"])
        origin = {"train_file": settings["train_file"]}
        if settings["heldout_file"] is not None:
            heldout = read_jsonl(settings["heldout_file"])
            origin["heldout_file"] = settings["heldout_file"]
        else:
            train, heldout = split(train, settings["heldout_fraction"], settings["data_seed"])
            origin["heldout_fraction"] = settings["heldout_fraction"]
    if not heldout:
        raise ConfigError(
            "finetune.heldout_fraction: the held-out split is empty (raise heldout_fraction or "
            "give a heldout_file); the comparison and the loss curve need it"
        )
    overlap = {r["instruction"] for r in train} & {r["instruction"] for r in heldout}
    write_jsonl(train_out, train)
    write_jsonl(heldout_out, heldout)
    return {
        **origin,
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "instructions_in_both": len(overlap),
    }


def split(records: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last ``fraction`` (at least one record) is held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)  # noqa: S311 - a reproducible split, not a secret
    n_heldout = max(1, round(len(records) * fraction)) if fraction > 0 else 0
    if n_heldout >= len(records):
        raise ConfigError(
            f"finetune.heldout_fraction: {fraction} of {len(records)} records leaves nothing "
            f"to train on"
        )
    cut = len(records) - n_heldout
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]


# --------------------------------------------------------------------------------------------
# Rendering and tokenisation
# --------------------------------------------------------------------------------------------


def messages(record: dict[str, Any], with_response: bool = True) -> list[dict[str, str]]:
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    out = []
    if record.get("system"):
        out.append({"role": "system", "content": record["system"]})
    out.append({"role": "user", "content": user})
    if with_response:
        out.append({"role": "assistant", "content": record["response"]})
    return out


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the fallback one; True if it had its own."""
    if getattr(tokenizer, "chat_template", None):
        return True
    tokenizer.chat_template = FALLBACK_TEMPLATE
    return False


def render(tokenizer, record: dict[str, Any]) -> tuple[str, str]:
    """(prompt text, prompt + response text) through the tokenizer's chat template."""
    prompt = tokenizer.apply_chat_template(
        messages(record, with_response=False), tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(messages(record), tokenize=False)
    if not full.startswith(prompt):
        # Templates that render the assistant turn differently from the generation prompt:
        # keep the prompt as generation sees it and append the response and end of turn.
        full = prompt + record["response"] + (tokenizer.eos_token or "")
    return prompt, full


def prompt_ids(tokenizer, record: dict[str, Any]) -> list[int]:
    prompt, _ = render(tokenizer, record)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        """Tokens whose next token is scored (the shifted label count)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def tokenize(tokenizer, record: dict[str, Any], seq_len: int) -> Example | None:
    """The example's token ids and labels (prompt masked); None when the prompt alone fills
    ``seq_len`` (nothing left to learn). A long response is cut at ``seq_len``."""
    prompt, full = render(tokenizer, record)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    common = 0
    for a, b in zip(p_ids, f_ids, strict=False):
        if a != b:
            break
        common += 1
    if common >= seq_len - 1 or common >= len(f_ids):
        return None
    f_ids = f_ids[:seq_len]
    labels = [IGNORE] * common + f_ids[common:]
    return Example(f_ids, labels)


def tokenize_all(tokenizer, records: Sequence[dict], seq_len: int) -> tuple[list[Example], int]:
    """Every record that fits; returns the examples and how many were dropped."""
    out = [tokenize(tokenizer, r, seq_len) for r in records]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(e.n_tokens for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = e.n_tokens
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover
