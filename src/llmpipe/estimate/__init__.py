"""Predict peak memory, runtime and GPU count for every workflow step from a model's config.json.

The numbers feed the rules' ``mem_mb``, ``runtime`` and GPU count, so the Slurm profile asks for
what a job needs: too little and the job is killed (OOM or time limit), too much and it queues
for longer than it should. The model is first-order on purpose: bytes are counted exactly where
they can be (weights, KV cache, optimizer state), activations and runtimes come from documented
formulas with tunable efficiency and safety factors (``Hardware``, ``Assumptions``).

Modules by role: ``formats`` (bits per weight of each dtype and quant type), ``shape`` (the
model's sizes from its config.json), ``hardware`` (GPU types of config ``hardware``, the CPU),
``assumptions`` (margins, throughputs), ``types`` (``Estimate``, GPU placement), the per-step
estimators ``prepare`` (download, cache_to_shm, convert_to_gguf, quantize, merge_lora),
``inference`` (evaluate, imatrix) and ``training`` (finetune), and ``cli``
(``llmpipe-estimate``).

Each estimator is named after the workflow rule (the step) it predicts.

Units: "MB" is MiB (2**20 bytes), which is what Slurm's ``--mem`` counts; GB in the CLI table is
GiB. Runtimes are wall-clock minutes for a job, including start-up.

The Snakemake planner imports this package: it stays on the standard library (no torch, no
numpy, no yaml) and imports nothing of ``llmpipe.evaluation`` or ``llmpipe.finetune``.
"""

from llmpipe.constants import IMATRIX_SUFFIX, MIB
from llmpipe.estimate.assumptions import CALIBRATED, DEFAULTS, Assumptions
from llmpipe.estimate.cli import estimate_all, main
from llmpipe.estimate.formats import bits_per_weight, bytes_per_weight, normalize_format
from llmpipe.estimate.hardware import V100, Hardware, cpu
from llmpipe.estimate.inference import evaluate_llama_cpp, evaluate_transformers, imatrix
from llmpipe.estimate.prepare import cache_to_shm, convert_to_gguf, download, merge_lora, quantize
from llmpipe.estimate.shape import ModelShape, gguf_bytes, weights_bytes
from llmpipe.estimate.training import finetune
from llmpipe.estimate.types import Estimate, gpus_needed

__all__ = [
    "CALIBRATED",
    "DEFAULTS",
    "IMATRIX_SUFFIX",
    "MIB",
    "V100",
    "Assumptions",
    "Estimate",
    "Hardware",
    "ModelShape",
    "bits_per_weight",
    "bytes_per_weight",
    "convert_to_gguf",
    "cache_to_shm",
    "cpu",
    "download",
    "estimate_all",
    "evaluate_llama_cpp",
    "evaluate_transformers",
    "finetune",
    "gguf_bytes",
    "gpus_needed",
    "imatrix",
    "main",
    "merge_lora",
    "normalize_format",
    "quantize",
    "weights_bytes",
]
