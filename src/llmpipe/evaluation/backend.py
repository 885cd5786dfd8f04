"""The evaluation backend interface and the registry of backends.

A backend is one module with one class that satisfies ``Backend``: it loads a model variant
and hands back a ``Model``, which generates, tokenizes and scores perplexity chunks. The
evaluation jobs (``jobs.py``) use nothing else of it, so a new backend is one module and one
line in ``BACKENDS``. The registry names the class as ``"module:Class"`` and imports it on
first use: planning reads names and sections without importing a backend, and the
transformers path never imports llama_cpp (nor the llama.cpp path torch).

A backend's name is the value users write in ``evaluate.backends``, the ``backend`` field of
every record and the ``{backend}`` of every result path. Its ``section`` is the config key of
its settings (``evaluate.<section>``) and of its environment modules (``envmodules.<section>``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from llmpipe.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from llmpipe.evaluation.figures import WeightBytes
    from llmpipe.evaluation.records import PromptResult, Sampling


@dataclass
class Generation:
    """What a model generated for a job's prompts."""

    results: list[PromptResult]  # in prompt order; each one's decode_s: the steps it was in
    decode_steps: int  # decode forward passes: one batched step reads the weights once
    decode_s: float  # time of those passes, every sequence together (the aggregate's time)
    sequences: int  # prompts decoded together at most (llama.cpp parallel, transformers batch)
    extra: dict = field(default_factory=dict)  # the backend's own record fields


@runtime_checkable
class Model(Protocol):
    """A loaded model variant, ready to generate and to score."""

    device: str  # where it runs, as the record names it ("cpu", the GPU's name)
    n_vocab: int
    bos_for_chunks: int | None  # BOS first in every perplexity chunk, or None
    kv_elem_bytes: float  # bytes of one K or V element in its cache

    def settings(self) -> dict:
        """The settings it runs with (the record's ``settings``)."""

    def warm_up(self) -> None:
        """One tiny pass so weights and kernels are ready before anything is timed."""

    def tune_threads(self, rows: int) -> dict:
        """``{"threads_used", "step_s"}``: the thread count kept for ``rows``-wide decoding
        (one when it is clearly faster on a busy CPU), with the step times measured."""

    def generate(self, prompts: list[tuple[int, str]], sampling: Sampling) -> Generation:
        """Every ``(index, prompt)`` with prefill and decode timed apart."""

    def tokenize(self, text: str) -> list[int]:
        """As the backend tokenizes a prompt or the perplexity text."""

    def chunk_logits(self, chunk_input: np.ndarray, first: int) -> np.ndarray:
        """float32 logits at positions ``first`` .. ``len(chunk_input) - 2``, one pass."""

    def weight_bytes(self) -> WeightBytes:
        """The weight bytes a decode step reads."""

    def gb_disk_to_device(self) -> float:
        """GB of weights read from disk onto the device at load."""

    def peak_vram_mb(self) -> float | None:
        """The backend's own peak device memory, None where it has none."""

    def close(self) -> None:
        """Free the model."""


@runtime_checkable
class Backend(Protocol):
    """A way to run models: names the staged copy it reads and loads a variant."""

    def stage_name(self, model_id: str, variant: str) -> str:
        """The name of the RAM-disk copy it loads (the one ``cache_to_shm`` made, or the
        variant's own)."""

    def load(
        self, path: Path, settings: dict, threads: int, *, gpus: int = 1, n_ctx: int | None = None
    ) -> Model:
        """The model at ``path`` with the backend's config section ``settings``, ``threads``
        CPU threads, ``gpus`` GPUs (the estimator's split) and, for perplexity, a context of
        exactly ``n_ctx`` tokens scored in one batch."""


@dataclass(frozen=True)
class BackendSpec:
    """A registry entry: the backend's name, its config section and where its class lives."""

    name: str
    section: str
    target: str  # "module:Class"

    def load_class(self) -> type:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


BACKENDS = {
    spec.name: spec
    for spec in (
        BackendSpec("llama.cpp", "llama_cpp", "llmpipe.evaluation.llama_backend:LlamaCppBackend"),
        BackendSpec("transformers", "transformers", "llmpipe.evaluation.hf_backend:HFBackend"),
    )
}


def spec(name: str) -> BackendSpec:
    """The registry entry of ``name``; one error naming the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"evaluate backend '{name}': expected one of {', '.join(BACKENDS)}"
        ) from None


def section(name: str) -> str:
    """The config section (``evaluate.<section>``, ``envmodules.<section>``) of ``name``."""
    return spec(name).section


def get(name: str) -> Backend:
    """The backend called ``name`` (its module imported now)."""
    return spec(name).load_class()()
