"""Resources of the workflow's jobs: the estimator's prediction for each rule, and what the job
measured while it ran, side by side in the job's record.

Planning side (``workflow/rules/common.smk``, evaluated for each job when it is ready to run)::

    p = plan("quantize", "results/models/m/hf/config.json", quant="Q4_K_M", threads=2)
    p.mem_mb, p.runtime_min        # the request: peak x margin (floored), runtime x margin
    p.peak_mb, p.runtime_s         # the raw prediction behind it

Running side (a rule's script)::

    with logged(...), Usage.of_job(snakemake, quant=...) as usage:
        quantize_gguf(..., extra=usage.fields)   # merges {"predicted", "measured"} into the record

"predicted" holds the raw peak and runtime, the same with margins, and what the job was given
(``snakemake.resources``); "measured" the sampled peaks (``llmpipe.monitor``), the RAM-disk bytes
this job wrote (tmpfs pages are charged to the job's memory, not to any process's RSS) and
``peak_mem_mb`` = peak RSS + those bytes, the number to compare with ``predicted.peak_mb``.

The Snakefile imports this module: standard library only (``llmpipe.monitor`` needs psutil and is
imported inside ``Usage``).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llmpipe import estimate as est
from llmpipe.errors import ConfigError, ResourceError
from llmpipe.estimate.hardware import planned_cpu, planned_gpu

MIB = est.MIB

# Assumptions every workflow prediction uses (the CLI's too): DEFAULTS with the CPU steps'
# process baselines calibrated on the workflow's own measurements.
ASSUMPTIONS = est.CALIBRATED

# Smallest memory request (MiB): below a Python interpreter's needs a request is meaningless,
# and Slurm sites hand out ~1 GB per core anyway.
MIN_MEM_MB = 1000

# Requests when the model's config.json cannot be read yet (a dry run before the download, a
# packaged GGUF that has no config.json until it is dequantized): enough for a 7B model in f16.
FALLBACK: dict[str, tuple[int, int]] = {  # step -> (mem_mb, runtime minutes)
    "download": (4000, 120),
    "cache_to_shm": (16000, 30),
    "convert_to_gguf": (8000, 60),
    "quantize": (4000, 60),
    "imatrix": (16000, 120),
    "evaluate_llama_cpp": (16000, 120),
    "evaluate_transformers": (32000, 120),
    "finetune": (32000, 240),
    "merge_lora": (32000, 60),
}

# Workflow steps (rule names) with an estimator of the same name in llmpipe.estimate.
STEPS = (
    "download",
    "cache_to_shm",
    "convert_to_gguf",
    "quantize",
    "imatrix",
    "evaluate_llama_cpp",
    "evaluate_transformers",
    "finetune",
    "merge_lora",
)
_ESTIMATORS: dict[str, Callable[..., est.Estimate]] = {step: getattr(est, step) for step in STEPS}


@dataclass(frozen=True)
class Plan:
    """One job's prediction. Memory in MiB (what Slurm's --mem counts), runtime in minutes.

    ``peak_mb`` is the predicted peak host memory including ``shm_mb`` (RAM-disk bytes the job
    may write); ``mem_mb`` the request (peak x margin, at least ``MIN_MEM_MB``); ``gpus`` and
    ``gpu_mem_mb`` (per GPU) for GPU steps. ``basis`` is the config.json the shape came from, or
    ``"fallback"`` when there was none (``FALLBACK`` requests, no raw prediction).
    """

    step: str
    mem_mb: int
    runtime_min: int
    basis: str
    peak_mb: float | None = None
    shm_mb: float = 0.0
    runtime_s: float | None = None
    gpus: int = 0
    gpu_mem_mb: int = 0
    margin: float = ASSUMPTIONS.mem_margin
    notes: tuple[str, ...] = field(default_factory=tuple)
    fits: bool = True
    on_gpu: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


# What "gpu" and "cpu" jobs are planned for: config ``hardware`` once ``use_hardware`` was
# called (the planner does, after validating the config), else the estimator's defaults.
_HARDWARE: dict[str, est.Hardware] = {}


def use_hardware(hardware: Mapping[str, Any], gpu_type: str) -> None:
    """Plan GPU jobs for ``gpu_type`` (config ``slurm.gpu_type``) of config ``hardware.gpus``
    and CPU jobs with ``hardware.cpu`` and this host's cores."""
    _HARDWARE["gpu"] = planned_gpu(hardware, gpu_type)
    _HARDWARE["cpu"] = planned_cpu(hardware, os.cpu_count() or 2)
    _PLANS.clear()


def _hardware(value: object) -> est.Hardware:
    if isinstance(value, est.Hardware):
        return value
    if value in (None, "gpu"):
        return _HARDWARE.get("gpu", est.V100)
    if value == "cpu":
        return _HARDWARE.get("cpu") or est.cpu(cores=os.cpu_count() or 2)
    raise ConfigError(f"resources: device {value!r}: expected 'cpu' or 'gpu'")


@functools.lru_cache(maxsize=256)
def _shape(path: str, mtime_ns: int) -> est.ModelShape:
    return est.ModelShape.from_config(path)


@functools.cache
def _parameters(step: str) -> frozenset[str]:
    return frozenset(inspect.signature(_ESTIMATORS[step]).parameters)


def model_shape(config_json: str | os.PathLike | None) -> est.ModelShape | None:
    """The model's shape from its config.json, or None when the file does not exist (yet).

    Cached on (path, mtime): the planner asks once per job, hundreds of times per run.
    """
    if config_json is None:
        return None
    try:
        stat = os.stat(config_json)
    except OSError:
        return None
    return _shape(str(config_json), stat.st_mtime_ns)


_PLANS: dict[tuple, Plan] = {}


def plan(step: str, config_json: str | os.PathLike | None, **options: Any) -> Plan:
    """Predict one job of ``step`` (a rule name in ``STEPS``) for the model at ``config_json``.

    ``options`` go to the estimator function (``quant``, ``threads``, ``outtype``, ``source``,
    ``dtype``, ``method``, ...); ``hw`` may be ``"cpu"`` or ``"gpu"``. Without a readable
    config.json the ``FALLBACK`` request is returned. Memoized on the arguments and the file's
    mtime: a dry run asks for every job's mem_mb, runtime and GPUs.
    """
    try:
        stat = os.stat(config_json) if config_json is not None else None
        key = (step, str(config_json), stat and stat.st_mtime_ns, tuple(sorted(options.items())))
        hash(key)
    except (OSError, TypeError):
        key = None
    if key is not None and key in _PLANS:
        return _PLANS[key]
    result = _plan(step, config_json, **options)
    if key is not None:
        _PLANS[key] = result
    return result


def _plan(step: str, config_json: str | os.PathLike | None, **options: Any) -> Plan:
    if step not in _ESTIMATORS:
        raise ConfigError(f"resources: unknown step {step!r} (expected one of {', '.join(STEPS)})")
    shape = model_shape(config_json)
    if shape is None:
        mem, runtime = FALLBACK[step]
        return Plan(step=step, mem_mb=mem, runtime_min=runtime, basis="fallback")
    options = dict(options)
    if "threads" in options and "threads" not in _parameters(step):
        del options["threads"]
    if "hw" in _parameters(step):  # the configured hardware unless a Hardware is given
        options["hw"] = _hardware(options.get("hw"))
    a = options.pop("a", ASSUMPTIONS)
    if step == "convert_to_gguf":
        options.setdefault("staged", True)  # reads its own RAM-disk copy (re-staged if foreign)
    try:
        estimate = _ESTIMATORS[step](shape, a=a, **options)
    except ConfigError as err:  # e.g. a type the estimator has no size for (TQ1_0, F16 target)
        mem, runtime = FALLBACK[step]
        return Plan(step, mem, runtime, basis="fallback", notes=(f"no estimate: {err}",))
    detail = estimate.detail
    peak = detail.get("host_peak_bytes")
    peak_mb = round(peak / MIB, 1) if peak is not None else None
    return Plan(
        step=step,
        mem_mb=max(MIN_MEM_MB, estimate.mem_mb),
        runtime_min=estimate.runtime_min,
        basis=str(config_json),
        peak_mb=peak_mb,
        shm_mb=round(detail.get("shm_bytes", 0) / MIB, 1),
        runtime_s=round(detail["runtime_s"], 1) if "runtime_s" in detail else None,
        gpus=estimate.gpus,
        gpu_mem_mb=estimate.gpu_mem_mb,
        margin=a.mem_margin,
        notes=estimate.notes,
        fits=estimate.fits,
        on_gpu="hw" in options and options["hw"].is_gpu,
    )


def model_config(model: str, models: Iterable[str] = (), root: str | os.PathLike = ".") -> Path:
    """Where the downloaded config.json of ``model`` is (it may not exist yet).

    A derived model that has no folder of its own (``<model>-ft``, the fine-tuned one, before
    its merge) has the shape of the longest listed (or downloaded) id it extends (``<id>-``).
    Plain string operations: the planner calls this for every job.
    """
    base = os.path.join(root, "results", "models")
    own = os.path.join(base, model, "hf", "config.json")
    if os.path.exists(own):
        return Path(own)
    known = list(models)
    if not known and os.path.isdir(base):
        known = os.listdir(base)
    parents = [m for m in known if model.startswith(f"{m}-")]
    if parents:
        return Path(base, max(parents, key=len), "hf", "config.json")
    return Path(own)


def download_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Estimator options of a model's download (one entry of config ``models``)."""
    source = spec["source"]
    return {"source": source, "dtype": spec.get("dtype") if source == "package" else None}


def download_config(spec: Mapping[str, Any], model: str, root: str | os.PathLike = ".") -> Path:
    """The config.json that sizes a download before it runs: a shared-storage folder's own;
    otherwise the downloaded one (there only afterwards: the planner falls back until then)."""
    if spec["source"] == "dir":
        return Path(spec["path"]) / "config.json"
    return Path(root, "results", "models", model, "hf", "config.json")


def request(step: str, config_json: str | os.PathLike | None, attempt: int = 1, **options) -> Plan:
    """``plan`` with the request scaled by the attempt (a retried job gets 2x, 3x...)."""
    p = plan(step, config_json, **options)
    scale = max(1, int(attempt))
    if scale == 1:
        return p
    return replace(p, mem_mb=p.mem_mb * scale, runtime_min=p.runtime_min * scale)


# What may make a GPU step that does not fit fit, tried in order (the estimator already tries
# every GPU count up to ``Assumptions.max_gpus``).
ALTERNATIVES: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "finetune": (
        ("gradient_checkpointing: true", {"gradient_checkpointing": True}),
        ("method: qlora", {"method": "qlora"}),
        ("method: qlora with gradient_checkpointing: true",
         {"method": "qlora", "gradient_checkpointing": True}),
        ("batch_size: 1 with gradient_checkpointing: true",
         {"micro_batch": 1, "gradient_checkpointing": True}),
    ),
    "evaluate_transformers": (("batch_size: 1", {"batch": 1}),),
}  # fmt: skip


def checked_request(
    model: str, step: str, config_json: str | os.PathLike | None, attempt: int = 1, **options
) -> Plan:
    """``request``, but planning stops (``ResourceError``, one line) when the estimator says a
    GPU step does not fit the configured hardware: the model, the step, why, and what would
    fit. Better now than an OOM after hours in the queue. CPU steps are not stopped: the
    planner does not know the compute nodes' RAM (the request says what they need)."""
    p = request(step, config_json, attempt, **options)
    if p.fits or not p.on_gpu:
        return p
    would = []
    for label, change in ALTERNATIVES.get(step, ()):
        if not set(change) <= _parameters(step) or all(options.get(k) == v for k, v in
                                                       change.items()):  # fmt: skip
            continue
        alt = plan(step, config_json, **{**options, **change})
        if alt.fits:
            would.append(f"{label} on {alt.gpus} GPU(s)")
            break
    why = p.notes[0] if p.notes else "over the GPUs' memory"
    fix = would[0] if would else "a smaller model or dtype, or GPUs with more memory"
    raise ResourceError(f"{model}: {step} does not fit: {why}; would fit: {fix}")


# --------------------------------------------------------------------------------------------
# Running side
# --------------------------------------------------------------------------------------------


def shm_written_bytes(record: Mapping[str, Any] | None) -> int:
    """RAM-disk bytes this job wrote, from a staging record (``hit`` False: a fresh copy), also
    when the record nests it (convert's ``staged_input``)."""
    if not record:
        return 0
    if "hit" in record and "bytes" in record:
        return 0 if record["hit"] else int(record["bytes"])
    nested = record.get("staged_input")
    return shm_written_bytes(nested) if isinstance(nested, Mapping) else 0


def gpu_facts() -> dict[str, Any]:
    """nvidia-smi's view (name, memory, driver) and, if this process imported torch, its CUDA."""
    from llmpipe import provenance

    facts: dict[str, Any] = {"nvidia_smi": provenance.gpus()}
    torch = sys.modules.get("torch")  # never import torch only to learn there is no GPU
    if torch is not None:
        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
        facts["cuda_available"] = bool(torch.cuda.is_available())
        if facts["cuda_available"]:
            facts["devices"] = [
                {
                    "name": torch.cuda.get_device_name(i),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                    "memory_mb": torch.cuda.get_device_properties(i).total_memory // MIB,
                }
                for i in range(torch.cuda.device_count())
            ]
    return facts


class Usage:
    """Measure a job while it runs and put the prediction next to the measurement.

    ``plan_args`` (step, config_json, options) are resolved when ``fields`` is called, after the
    work: a download's config.json exists only then. ``requested`` is what the job was given.
    """

    def __init__(
        self,
        step: str | None,
        config_json: str | os.PathLike | None,
        options: Mapping[str, Any] | None = None,
        requested: Mapping[str, Any] | None = None,
        interval: float = 0.5,
        rule: str | None = None,
    ):
        from llmpipe.monitor import ResourceMonitor

        self.step = step
        self.config_json = config_json
        self.options = dict(options or {})
        self.requested = dict(requested or {})
        self.rule = rule or step  # the rule whose job this is (it may plan as another step)
        self.monitor = ResourceMonitor(interval=interval)

    @classmethod
    def of_job(
        cls,
        smk: Any,
        config_json: str | os.PathLike | None = None,
        step: str | None = None,
        **options,
    ) -> Usage:
        """For a Snakemake script: step = the rule (unless given: an evaluation rule plans with
        its backend's step), model from the wildcards, requested from ``snakemake.resources``
        and ``snakemake.threads``."""
        res = smk.resources
        requested = {
            "mem_mb": getattr(res, "mem_mb", None),
            "runtime_min": getattr(res, "runtime", None),
            "threads": smk.threads,
        }
        if config_json is None:
            config_json = model_config(smk.wildcards.model)
        options.setdefault("threads", smk.threads)  # as the planner asked
        # the script's process plans for the same hardware as the planner did
        use_hardware(smk.config["hardware"], smk.config["slurm"]["gpu_type"])
        return cls(step or smk.rule, config_json, options, requested, rule=smk.rule)

    def __enter__(self) -> Usage:
        self.monitor.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.monitor.stop()

    def planned_gpus(self) -> int:
        """The GPUs the estimator gave this job (what its --gres asked for); 1 without a
        prediction (a benchmark's own run) or on the CPU."""
        if self.step is None:
            return 1
        try:
            return max(1, plan(self.step, self.config_json, **self.options).gpus)
        except Exception:  # noqa: BLE001 - no prediction: one device, as without a plan
            return 1

    def fields(self, record: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{"predicted": ..., "measured": ...}`` (+ ``"gpu"`` where there is one) for the
        record; stops the sampler, so call it once the work is done. Without a step (a
        benchmark's own run) there is no "predicted"."""
        self.monitor.stop()
        summary = self.monitor.summary()
        shm_mb = round(shm_written_bytes(record) / MIB, 1)
        measured = {
            **summary,
            "shm_mb": shm_mb,
            "peak_mem_mb": round((summary["peak_rss_mb"] or 0) + shm_mb, 1),
        }
        out: dict[str, Any] = {"measured": measured}
        if self.step is not None:
            predicted: dict[str, Any]
            try:
                predicted = plan(self.step, self.config_json, **self.options).as_dict()
            except Exception as err:  # noqa: BLE001 - a failed prediction must not fail the step
                predicted = {"step": self.step, "error": str(err)}
            predicted["rule"] = self.rule
            predicted["requested"] = self.requested
            out = {"predicted": predicted, **out}
        if summary.get("peak_gpu_mem_mb") is not None or _has_gpu_driver():
            out["gpu"] = gpu_facts()
        return out


def _has_gpu_driver() -> bool:
    from llmpipe import provenance

    return bool(provenance.gpus())
