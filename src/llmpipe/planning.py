"""What the workflow derives from its config, computed once per run: models, variants, the
files `rule all` and `aggregate_stats` ask for, and each job's estimator step and options.

``workflow/rules/common.smk`` builds one ``RunPlan`` and keeps only wildcard -> path functions
and one resource factory around it, so everything here is plain Python that unit tests reach
without Snakemake. Standard library only (plus the package's own planning modules): the
Snakefile imports it on every run and inside every job.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from llmpipe import architectures as arch
from llmpipe import config as cfg
from llmpipe import resources as res
from llmpipe.errors import ConfigError
from llmpipe.estimate.hardware import bandwidth_table
from llmpipe.evaluation import placements as pl
from llmpipe.evaluation.backend import BACKENDS
from llmpipe.finetune import settings as ft

# The evaluation backends (the {backend} wildcard) and their config sections, from the registry.
BACKEND_SECTIONS = {name: spec.section for name, spec in BACKENDS.items()}
# The estimator step an evaluation job plans with, per backend.
BACKEND_STEPS = {"llama.cpp": "evaluate_llama_cpp", "transformers": "evaluate_transformers"}
# Evaluation job kinds: generation shards, the reference's perplexity, a variant's quality.
EVAL_KINDS = ("shard", "reference", "quality")
# Bytes per token when a text's token count is bounded from its size before tokenization.
BYTES_PER_TOKEN = 4


# An evaluation rule that loads a model has a twin per backend (evaluate.smk): environment
# modules are fixed per rule, and each job loads only its own backend's.
BACKEND_RULE_SUFFIX = {"llama.cpp": "", "transformers": "_transformers"}


def eval_rule(rule: str, backend: str) -> str:
    """The rule that runs ``rule``'s jobs (evaluate_shard, evaluate_reference) for ``backend``."""
    return rule + BACKEND_RULE_SUFFIX[backend]


# Rule -> the output that is its job's record, for the jobs whose records the report reads (the
# generation shards, evaluate_shard, are read through the eval JSON: its most memory-hungry one).
RECORD_OUTPUTS = {
    "download": "manifest",
    "merge_lora": "manifest",
    "cache_to_shm": "record",
    "convert_to_gguf": "record",
    "quantize": "record",
    "imatrix": "record",
    "evaluate_reference": "result",
    "evaluate_reference_transformers": "result",
    "evaluate_quality": "result",
    "finetune": "metrics",
    "compare_finetune": "record",
}


class StatsJob(NamedTuple):
    """One job whose record the report reads: its rule, the model and target (variant) of its
    row, and the wildcards that name its files (rules.<rule>.output in common.smk)."""

    rule: str
    model: str
    target: str
    wildcards: dict[str, str]

    @property
    def record_output(self) -> str:
        """The name of the rule's output that is this job's record."""
        return RECORD_OUTPUTS[self.rule]


class RunPlan:
    """The run's plan, from a config that ``llmpipe.config.validate`` has already checked.

    ``root`` is the working directory the relative paths (``results/...``) are resolved in
    when a file's size or a model's config.json is read.
    """

    def __init__(self, config: Mapping[str, Any], root: str | os.PathLike = "."):
        self.config = config
        self.root = os.fspath(root)
        # GPU jobs are planned for slurm.gpu_type of the hardware table, CPU jobs for its cpu
        res.use_hardware(config["hardware"], config["slurm"]["gpu_type"])
        # the roofline's peak bandwidths, matched on the device's name (same table)
        self.bandwidth_table = bandwidth_table(config["hardware"])
        self.base_models = cfg.model_ids(config)
        self.tuned_models = ft.tuned_models(config)
        self.models = self.base_models + self.tuned_models
        self.reference = cfg.reference_variant(config)
        # the plain types, then the <TYPE>-imat ones (quantize.imatrix.types)
        self.quants = cfg.quant_variants(config)
        self.finetune_bases = ft.base_models(config)
        self.tuned_bases = {ft.tuned_id(base): base for base in self.finetune_bases}
        # which models the pinned llama.cpp can take (from each config.json): the others keep
        # every step that needs no GGUF; their GGUF steps are not scheduled
        self.gguf_support = arch.plan(
            config["models"], self.tuned_bases, hub_cache_dir=config["hub"]["cache_dir"]
        )
        self.gguf_models = [m for m in self.models if self.gguf_support[m].supported]
        self.eval = config["evaluate"]
        self.backends = list(self.eval["backends"])
        self.prompts = cfg.read_prompts(config["prompts"])
        self.prompt_tokens = cfg.prompt_tokens_bound(self.prompts)
        self.imatrix = config["quantize"]["imatrix"]

    # ---- GGUF -----------------------------------------------------------------------------
    def gguf_notes(self) -> dict[str, str]:
        """{model: why its GGUF steps are planned as they are}, for the models that have one."""
        notes = {}
        for model, support in self.gguf_support.items():
            if not support.reason:
                continue
            base = self.tuned_bases.get(model, model)
            notes[model] = (
                support.reason
                if support.supported
                else f"not converted: {support.reason} (force with models.{base}.force_gguf: true)"
            )
        return notes

    def gguf_summary_notes(self) -> dict[str, str]:
        """The lasting notes (not converted, or forced) for summary.md, not "not downloaded yet"."""
        return {
            model: note
            for model, note in self.gguf_notes().items()
            if not self.gguf_support[model].supported
            or self.config["models"][self.tuned_bases.get(model, model)].get("force_gguf")
        }

    def gguf_variants(self, model: str) -> list[str]:
        """The GGUF variants of a model: the reference and every quantization, or none."""
        if not self.gguf_support[model].supported:
            return []
        return [self.reference, *cfg.quant_variants(self.config, model)]

    def gguf(self, model: str, variant: str) -> str:
        return f"results/gguf/{model}/{model}-{variant}.gguf"

    def gguf_record(self, model: str, variant: str) -> str:
        return f"results/gguf/{model}/{model}-{variant}.json"

    # ---- Evaluation -----------------------------------------------------------------------
    def all_eval_variants(self) -> set[str]:
        return {self.reference, *self.quants, "hf"}

    def eval_variants(self, model: str, backend: str) -> list[str]:
        """The variants of ``model`` that ``backend`` evaluates; its first is the backend's
        quality reference (the reference GGUF; the HF folder)."""
        if backend == "llama.cpp":
            return self.gguf_variants(model)
        return ["hf"]

    def eval_reference(self, backend: str) -> str:
        return self.reference if backend == "llama.cpp" else "hf"

    def eval_json(self, model: str, variant: str, backend: str) -> str:
        return f"results/eval/{model}/{variant}-{backend}.json"

    def eval_jsons(self) -> list[tuple[str, str, str]]:
        """(model, variant, backend) of every evaluation the run makes."""
        return [
            (model, variant, backend)
            for model in self.models
            for backend in self.backends
            for variant in self.eval_variants(model, backend)
        ]

    def runs_sweep(self, model: str) -> bool:
        return (
            self.eval["sweep"]["enabled"]
            and "llama.cpp" in self.backends
            and model in self.gguf_models
        )

    def eval_outputs(self) -> list[str]:
        """The eval JSONs and texts of every model x backend x variant (+ the sweep tables)."""
        outputs = []
        for model in self.models:
            for backend in self.backends:
                for variant in self.eval_variants(model, backend):
                    stem = f"results/eval/{model}/{variant}-{backend}"
                    outputs += [f"{stem}.json", f"{stem}.texts.jsonl"]
            if self.runs_sweep(model):
                outputs.append(f"results/eval/{model}/sweep-llama.cpp.tsv")
        outputs += [self.task_json(m, v, b) for m, v, b in self.task_jsons()]
        return outputs + self.placement_outputs()

    # ---- Placements (evaluate_placement) ------------------------------------------------------
    @functools.cached_property
    def placement_plan(self) -> list[tuple[pl.Placement, str | None]]:
        """Every configured placement and why this run cannot measure it (None: it can),
        decided here, before anything runs."""
        section = self.eval["placements"]
        if not section["enabled"] or "llama.cpp" not in self.backends:
            return []
        variant = self.placement_variant
        if variant not in (self.reference, *self.quants):
            raise ConfigError(
                f"evaluate.placements.variant: {variant!r} is neither gguf.reference nor one of "
                f"the quantizations ({', '.join(self.quants) or 'none'})"
            )
        gpus, rpc = pl.gpu_build(), pl.rpc_build()
        return [
            (p, pl.why_not(p, gpus_available=gpus, rpc_available=rpc))
            for p in pl.placements(section)
        ]

    @property
    def placement_variant(self) -> str:
        return self.eval["placements"]["variant"] or self.reference

    def placement(self, name: str) -> pl.Placement:
        return next(p for p, _ in self.placement_plan if p.name == name)

    def placements_run(self) -> list[pl.Placement]:
        return [p for p, why in self.placement_plan if why is None]

    def placement_notes(self) -> dict[str, str]:
        """The placements not run, with the reason (for the summary)."""
        return {p.name: why for p, why in self.placement_plan if why is not None}

    def placement_models(self) -> list[str]:
        """The configured models (a tuned model has its base's shape, so its base's speed)."""
        variant = self.placement_variant if self.placement_plan else None
        return [
            m
            for m in self.gguf_models
            if m not in self.tuned_bases and variant in self.gguf_variants(m)
        ]

    def placement_estimate(self, name: str) -> tuple[str, dict]:
        """A placement job plans as a llama.cpp evaluation of the placed GGUF: llama-bench's
        prompt test and generation test, after one warm-up, on the whole model."""
        section, llama = self.eval["placements"], self.eval["llama_cpp"]
        placement = self.placement(name)
        return "evaluate_llama_cpp", {
            "hw": "gpu" if placement.gpus else "cpu",
            "quant": self.placement_variant,
            "kv_type": llama["kv_type"],
            "flash_attn": llama["flash_attn"],
            "n_ctx": max(section["n_prompt"] + section["n_gen"], 64),
            "seq_len": section["n_prompt"],
            "new_tokens": section["n_gen"],
            "samples": section["repetitions"] + 1,
            "outputs": 1,
            "staged": False,
        }

    def placement_json(self, model: str, name: str) -> str:
        return f"results/eval/{model}/placements/{name}.json"

    def placement_outputs(self) -> list[str]:
        return [
            self.placement_json(m, p.name)
            for m in self.placement_models()
            for p in self.placements_run()
        ]

    # ---- Task accuracy (evaluate.tasks) -----------------------------------------------------
    @property
    def tasks(self) -> Mapping[str, Any]:
        return self.eval["tasks"]

    def task_variants(self, model: str, backend: str) -> list[str]:
        """The variants of ``model`` whose task accuracy ``backend`` measures (none when off)."""
        if not self.tasks["enabled"]:
            return []
        wanted = self.tasks["variants"]
        return [v for v in self.eval_variants(model, backend) if wanted is None or v in wanted]

    def task_jsons(self) -> list[tuple[str, str, str]]:
        """(model, variant, backend) of every task evaluation the run makes."""
        return [
            (model, variant, backend)
            for model in self.models
            for backend in self.backends
            for variant in self.task_variants(model, backend)
        ]

    def task_json(self, model: str, variant: str, backend: str) -> str:
        return f"results/eval/{model}/tasks/{variant}-{backend}.json"

    def task_files(self) -> list[str]:
        """The shipped files of the configured tasks (``<task_dir>/<name>.*``: YAML and data),
        so that a changed task file reruns the task jobs; registry tasks have none here."""
        task_dir = os.path.join(self.root, self.tasks["task_dir"])
        files = []
        for name in self.tasks["names"]:
            for suffix in (".yaml", ".jsonl", ".json"):
                path = os.path.join(self.tasks["task_dir"], name + suffix)
                if os.path.isfile(os.path.join(task_dir, name + suffix)):
                    files.append(path)
        return files

    def tasks_estimate(self, backend: str, variant: str) -> tuple[str, dict]:
        """A task job plans as a generation shard of batch_size requests of n_ctx tokens: the
        hf model's batch, or llama-server's slots (their KV cache: n_ctx x slots)."""
        step, opts = self.eval_estimate(backend, variant, "shard")
        batch, n_ctx = self.tasks["batch_size"], self.tasks["n_ctx"]
        opts.update(samples=batch, seq_len=n_ctx // 2, new_tokens=n_ctx // 2, staged=False)
        if backend == "llama.cpp":
            opts.update(n_ctx=n_ctx * batch)
        else:
            opts.update(batch=batch)
        return step, opts

    def eval_quality(self, model: str, variant: str, backend: str) -> str:
        """The reference's quality is its own perplexity (KLD 0); others are compared with it."""
        if variant == self.eval_reference(backend):
            return f"results/eval/{model}/reference-{backend}.json"
        return f"results/eval/{model}/quality/{variant}-{backend}.json"

    def eval_settings(self, backend: str) -> Mapping[str, Any]:
        return self.eval[BACKEND_SECTIONS[backend]]

    def eval_on_gpu(self, backend: str) -> bool:
        if backend == "llama.cpp":
            return self.eval["llama_cpp"]["n_gpu_layers"] != 0
        return self.eval["transformers"]["device"] == "cuda"

    def _text_bytes(self, path: str) -> int:
        try:
            return os.path.getsize(os.path.join(self.root, path))
        except OSError:
            return 0

    @functools.cached_property
    def eval_chunks(self) -> int:
        """Perplexity chunks, bounded from the text's size before it is tokenized."""
        n_ctx, chunks = self.eval["perplexity"]["n_ctx"], self.eval["perplexity"]["chunks"]
        approx = max(1, self._text_bytes(self.eval["text"]) // BYTES_PER_TOKEN // n_ctx)
        return min(chunks, approx) if chunks else approx

    def eval_estimate(self, backend: str, variant: str | None, kind: str) -> tuple[str, dict]:
        """Estimator step and options of an evaluation job (``kind`` in ``EVAL_KINDS``).

        Generation shards: the longest prompt's tokens and max_new_tokens; perplexity jobs: one
        chunk of perplexity.n_ctx tokens, logits for each.
        """
        if kind not in EVAL_KINDS:
            raise ValueError(f"evaluation kind {kind!r}: expected one of {EVAL_KINDS}")
        gpu = self.eval_on_gpu(backend)
        ppl = kind != "shard"
        chunk = self.eval["perplexity"]["n_ctx"]
        shards = self.config["farm"]["shards"]
        opts: dict[str, Any] = {
            "hw": "gpu" if gpu else "cpu",
            "staged": True,
            "samples": self.eval_chunks if ppl else -(-len(self.prompts) // shards),
            "new_tokens": 1 if ppl else self.eval["sampling"]["max_new_tokens"],
            "seq_len": chunk - 1 if ppl else self.prompt_tokens,
        }
        if backend == "llama.cpp":
            llama = self.eval["llama_cpp"]
            opts.update(
                quant=variant or self.eval_reference(backend),
                batch=1 if ppl else llama["parallel"],  # sequences in one context
                kv_type=llama["kv_type"],
                n_ctx=chunk if ppl else llama["n_ctx"],
                flash_attn=llama["flash_attn"],
                # logits kept per pass: the scored second half of a chunk (llama-perplexity's)
                outputs=chunk - 1 - chunk // 2 if ppl else 1,
                kld_chunks=self.eval_chunks if kind == "quality" else 0,
            )
        else:
            dtype = self.eval["transformers"]["dtype"]
            if dtype == "auto":
                dtype = "float16" if gpu else "float32"
            opts.update(
                dtype=dtype,
                batch=1 if ppl else self.eval["transformers"]["batch_size"],
                full_logits=ppl,
            )
        return BACKEND_STEPS[backend], opts

    # ---- Importance matrix ----------------------------------------------------------------
    def imatrix_on_gpu(self) -> bool:
        return self.eval["llama_cpp"]["n_gpu_layers"] != 0

    @functools.cached_property
    def imatrix_chunks(self) -> int:
        """Chunks llama-imatrix will read, at most quantize.imatrix.chunks (bounded from the
        text's size; the default text is what follows the evaluation's perplexity chunks)."""
        if self.imatrix["text"] is None:
            used = self.eval_chunks * self.eval["perplexity"]["n_ctx"] * BYTES_PER_TOKEN
            size = self._text_bytes(self.eval["text"]) - used
        else:
            size = self._text_bytes(self.imatrix["text"])
        return max(1, min(self.imatrix["chunks"], size // BYTES_PER_TOKEN // self.imatrix["n_ctx"]))

    def imatrix_estimate(self) -> dict[str, Any]:
        return {
            "source": self.reference,
            "hw": "gpu" if self.imatrix_on_gpu() else "cpu",
            "n_ctx": self.imatrix["n_ctx"],
            "chunks": self.imatrix_chunks,
        }

    def quantize_inputs(self, model: str, quant: str) -> dict[str, str]:
        """The reference GGUF, and for a -imat variant the model's importance matrix."""
        inputs = {"gguf": self.gguf(model, self.reference)}
        if cfg.split_variant(quant)[1]:
            inputs["imatrix"] = f"results/gguf/{model}/{model}.imatrix"
        return inputs

    def imatrix_inputs(self, model: str) -> dict[str, str]:
        """The reference GGUF, the evaluation text (its chunks are cut off or checked against)
        and the user's calibration text when there is one."""
        inputs = {"gguf": self.gguf(model, self.reference), "eval_text": self.eval["text"]}
        if self.imatrix["text"] is not None:
            inputs["text"] = self.imatrix["text"]
        return inputs

    # ---- Fine-tuning ----------------------------------------------------------------------
    def finetune_settings(self, model: str) -> ft.Settings:
        return ft.resolve(self.config, model)

    def finetune_outputs(self) -> list[str]:
        """Adapter, loss curve, metrics, base-vs-tuned table (+ GGUF adapter) per tuned model."""
        outputs = []
        for model in self.finetune_bases:
            stem = f"results/finetune/{model}"
            outputs += [
                f"{stem}/adapter",
                f"{stem}/loss.csv",
                f"{stem}/loss.png",
                f"{stem}/metrics.json",
                f"{stem}/comparison.csv",
                f"{stem}/comparison.md",
                f"{stem}/comparison.json",
            ]
            if self.finetune_settings(model).adapter_gguf and model in self.gguf_models:
                outputs.append(f"{stem}/adapter-F16.gguf")
        return outputs

    def compare_estimate(self, model: str) -> tuple[str, dict]:
        """compare_finetune plans as a transformers evaluation of the held-out set."""
        heldout = f"results/finetune/{model}/data/heldout.jsonl"
        options = ft.compare_estimate_options(self.finetune_settings(model), heldout)
        return "evaluate_transformers", options

    # ---- Statistics -----------------------------------------------------------------------
    def model_job(self, model: str) -> StatsJob:
        """The job that made a model's folder: its download, or a tuned model's merge."""
        if model in self.tuned_bases:
            return StatsJob("merge_lora", model, "", {"model": self.tuned_bases[model]})
        return StatsJob("download", model, "", {"model": model})

    def gguf_job(self, model: str, variant: str) -> StatsJob:
        """The job that wrote a GGUF: the conversion (the reference) or a quantization."""
        if variant == self.reference:
            return StatsJob(
                "convert_to_gguf", model, variant, {"model": model, "reference": variant}
            )
        return StatsJob("quantize", model, variant, {"model": model, "quant": variant})

    def weights_jobs(self) -> list[StatsJob]:
        """Per evaluation (``eval_jsons`` order), the job whose record describes what it
        loaded: the GGUF's, or the model folder's."""
        return [
            self.gguf_job(m, v) if b == "llama.cpp" else self.model_job(m)
            for m, v, b in self.eval_jsons()
        ]

    def stats_jobs(self) -> list[StatsJob]:
        """Every job with a resource record, for aggregate_stats: per model its folder,
        staging, GGUFs and importance matrix; then the perplexity jobs of every evaluation
        (the generation shards' are in the eval JSONs); then the fine-tunes and comparisons."""
        jobs = []
        for model in self.models:
            jobs += [self.model_job(model), StatsJob("cache_to_shm", model, "", {"model": model})]
            variants = self.gguf_variants(model)
            jobs += [self.gguf_job(model, v) for v in variants]
            if any(cfg.split_variant(v)[1] for v in variants):
                jobs.append(StatsJob("imatrix", model, "", {"model": model}))
        for model in self.models:
            for backend in self.backends:
                variants = self.eval_variants(model, backend)
                if not variants:
                    continue
                reference = self.eval_reference(backend)
                wc = {"model": model, "backend": backend}
                rule = eval_rule("evaluate_reference", backend)
                jobs.append(StatsJob(rule, model, f"{reference}-{backend}", wc))
                jobs += [
                    StatsJob("evaluate_quality", model, f"{v}-{backend}", {**wc, "variant": v})
                    for v in variants
                    if v != reference
                ]
        for base in self.finetune_bases:
            jobs.append(StatsJob("finetune", ft.tuned_id(base), "", {"model": base}))
            jobs.append(StatsJob("compare_finetune", base, "", {"model": base}))
        return jobs

    def final_outputs(self) -> list[str]:
        """Everything `rule all` asks for."""
        outputs = []
        for model in self.models:
            outputs.append(f"results/staged/{model}/stage.json")
            for variant in self.gguf_variants(model):
                outputs += [self.gguf(model, variant), self.gguf_record(model, variant)]
        outputs += self.eval_outputs()
        outputs += self.finetune_outputs()
        outputs += STATS_OUTPUTS
        return outputs

    # ---- Resources ------------------------------------------------------------------------
    def request(
        self, model: str, step: str, options: Mapping[str, Any], threads: int, attempt: int
    ) -> res.Plan:
        """The estimator's prediction and request for one job of ``step`` (a rule name in
        ``llmpipe.resources.STEPS``) on ``model``; planning stops when a GPU step does not
        fit. The shape comes from the model's downloaded config.json (a ``dir`` model's own
        before its download); until one exists, the conservative fallback."""
        opts = dict(options)
        if step == "download":
            config_json = res.download_config(self.config["models"][model], model, self.root)
        else:
            config_json = res.model_config(model, self.models, self.root)
        opts.setdefault("threads", threads)
        return res.checked_request(model, step, config_json, attempt, **opts)

    def modules(self, kind: str) -> list[str]:
        """Environment modules of a rule of ``kind``, a key of config ``envmodules``: the
        Python stack (``transformers``) for every rule, plus ``llama_cpp``'s for its tools."""
        envmodules = self.config["envmodules"]
        if kind not in envmodules:
            raise ValueError(
                f"envmodules: no key {kind!r} (expected one of {', '.join(envmodules)})"
            )
        modules = list(envmodules["transformers"])
        if kind != "transformers":
            modules += envmodules[kind]
        return modules

    def gres(self, gpus: int) -> str:
        """--gres for a GPU count: gpu:<slurm.gpu_type>:<N>, or "" (no gres) for none."""
        return f"gpu:{self.config['slurm']['gpu_type']}:{gpus}" if gpus else ""

    def partition(self, gpus: int, nodes: int = 1) -> str:
        """The GPU partition when a job needs GPUs; else "" (the site's default partition);
        slurm.multinode_partition, where set, for a job of several nodes."""
        if nodes > 1 and self.config["slurm"].get("multinode_partition"):
            return self.config["slurm"]["multinode_partition"]
        return self.config["slurm"]["gpu_partition"] if gpus else ""


STATS_OUTPUTS = ["results/stats/summary.csv", "results/stats/summary.md"]
