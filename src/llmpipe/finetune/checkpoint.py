"""Checkpoints that let an interrupted fine-tune resume: complete or absent, never half-written.

``<dir>/checkpoint-0000040/`` holds the trainable (LoRA) weights (``trainable.safetensors``),
the optimizer, scheduler and loss-scaler state (``optimizer.pt``), each process's RNG state
(``rng-<rank>.pt``) and ``state.json`` (step, loss history, the run's fingerprint). It is
written under ``.tmp-checkpoint-0000040`` and renamed when every file is on disk, so a process
killed at any moment (SIGKILL, a Slurm time limit, a node failure) leaves the previous
checkpoint intact. A rerun resumes from the newest checkpoint whose fingerprint matches: the
fingerprint covers the base model, the data and every training setting, so a checkpoint of
other settings is never resumed (such checkpoints are removed when the new run saves).

The folder lives on shared storage (``results/finetune/<model>/checkpoints``), so a run requeued
on other nodes finds it. The weights are the full (unsharded) tensors, whatever the strategy:
a checkpoint of a DDP run resumes under FSDP and vice versa.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llmpipe.atomic import TMP_PREFIX
from llmpipe.finetune.distributed import Dist, barrier

PREFIX = "checkpoint-"
_NAME = re.compile(r"checkpoint-(\d{7})")
STATE = "state.json"


def fingerprint(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def complete(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints in ``folder``, oldest first (temporaries are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and (path / STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(folder: str | os.PathLike, fp: str) -> tuple[Path, dict] | None:
    """The newest checkpoint made with fingerprint ``fp``, and its state; None if there is none."""
    for _, path in reversed(complete(folder)):
        state = json.loads((path / STATE).read_text())
        if state.get("fingerprint") == fp:
            return path, state
    return None


def _model_options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True)


def trainable_state(model, d: Dist) -> dict:
    """The trainable parameters as full CPU tensors (on rank 0; other ranks may get {})."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not d.enabled:
        return {
            n: p.detach().to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    return get_model_state_dict(model, options=_model_options(True))


def load_trainable_state(model, state: dict, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not d.enabled:
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
        if missing:
            raise KeyError(f"checkpoint lacks trainable parameters: {missing[:3]}")
        params = dict(model.named_parameters())
        import torch

        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
        return
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model, optimizer, d: Dist) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not d.enabled:
        return optimizer.state_dict()
    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(model, optimizer, state: dict, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not d.enabled:
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def rng_state() -> dict:
    """The RNG LoRA dropout draws from (the data order needs none: it is seeded per epoch)."""
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    folder: str | os.PathLike,
    step: int,
    state: dict,
    model,
    optimizer,
    extra_states: dict,
    d: Dist,
    keep: int,
) -> Path | None:
    """Write checkpoint ``step`` (collective: every process calls it); returns its path."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    final = folder / name(step)
    tmp = folder / f"{TMP_PREFIX}{name(step)}"
    weights = trainable_state(model, d)  # collective under FSDP
    optim = optimizer_state(model, optimizer, d)  # collective under FSDP
    if d.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(d)
    torch.save(rng_state(), tmp / f"rng-{d.rank}.pt")
    barrier(d)
    if d.is_main:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim, **extra_states}, tmp / "optimizer.pt")
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(folder, keep, state.get("fingerprint"))
    barrier(d)
    return final


def prune(folder: Path, keep: int, fp: str | None) -> None:
    """Keep the newest ``keep`` checkpoints of this run; drop other runs' and temporaries."""
    mine = []
    for _, path in complete(folder):
        state = json.loads((path / STATE).read_text())
        if state.get("fingerprint") == fp:
            mine.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in mine[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(f"{TMP_PREFIX}{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def load(path: Path, model, optimizer, d: Dist) -> dict:
    """Restore weights, optimizer and this rank's RNG from ``path``; returns the extra states
    (scheduler, scaler) saved with the optimizer."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    load_trainable_state(model, weights, d)
    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    load_optimizer_state(model, optimizer, saved.pop("optimizer"), d)
    rng = path / f"rng-{d.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return saved
