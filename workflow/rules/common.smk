# Shared by all rules: the run's plan (llmpipe.planning), wildcard -> path functions and one
# resource factory. Parsed on every run and inside every job: keep it light (no torch, no
# transformers). The planning logic itself lives, unit-tested, in the llmpipe package.
import re
import sys

from llmpipe import config as cfg
from llmpipe import imatrix as imat
from llmpipe import planning
from llmpipe import resources as res
from llmpipe.finetune import settings as ft

cfg.validate(config, workflow.source_path("../schemas/config.schema.yaml"))
cfg.check(config)
ft.check(config)

PLAN = planning.RunPlan(config)
# Base models are downloaded; a tuned model (<base>-ft, finetune.enabled_for) comes from the
# finetune stage. Both kinds go through convert_to_gguf, quantize and evaluate.
BASE_MODELS = PLAN.base_models
MODELS = PLAN.models
REFERENCE = PLAN.reference
QUANTS = PLAN.quants
EVAL = PLAN.eval
IMATRIX = PLAN.imatrix
FINETUNE_BASE_REGEX = ft.id_regex(PLAN.finetune_bases)
BASE_MODEL_REGEX = ft.id_regex(BASE_MODELS)

if workflow.is_main_process:  # once per run, not again inside every job
    for _model, _note in PLAN.gguf_notes().items():
        print(f"{_model}: GGUF steps {_note}", file=sys.stderr)
    for _warning in imat.planning_warnings(config):
        print(f"warning: {_warning}", file=sys.stderr)


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    quant="|".join(map(re.escape, QUANTS)) if QUANTS else "(?!)",
    backend="|".join(map(re.escape, planning.BACKEND_SECTIONS)),
    variant="|".join(map(re.escape, sorted(PLAN.all_eval_variants()))),


# ---- Wildcards -> paths and params ---------------------------------------------------------
def get_model_spec(wildcards):
    return config["models"][wildcards.model]


def get_final_outputs():
    """Everything `rule all` asks for, from the config."""
    return PLAN.final_outputs()


def get_quant(wildcards):
    return wildcards.quant


def get_quant_type(wildcards):
    """The llama.cpp type of a variant: Q4_K_M for both Q4_K_M and Q4_K_M-imat."""
    return cfg.split_variant(wildcards.quant)[0]


def get_quantize_input(wildcards):
    return PLAN.quantize_inputs(wildcards.model, wildcards.quant)


def get_imatrix_input(wildcards):
    return PLAN.imatrix_inputs(wildcards.model)


def get_eval_model(wildcards):
    """The model files an evaluation job loads (named inputs; `hf` sizes the FLOPs)."""
    model, backend = wildcards.model, wildcards.backend
    variant = getattr(wildcards, "variant", None) or PLAN.eval_reference(backend)
    hf = f"results/models/{model}/hf"
    if backend == "transformers":
        return {
            "model": hf,
            "manifest": f"results/models/{model}/manifest.json",
            "staged": f"results/staged/{model}/stage.json",
            "hf": hf,
        }
    return {
        "model": PLAN.gguf(model, variant),
        "record": PLAN.gguf_record(model, variant),
        "hf": hf,
    }


def get_eval_reference(wildcards):
    return PLAN.eval_reference(wildcards.backend)


def get_eval_quality(wildcards):
    return PLAN.eval_quality(wildcards.model, wildcards.variant, wildcards.backend)


def get_eval_settings(wildcards):
    return PLAN.eval_settings(wildcards.backend)


def get_eval_probe(wildcards):
    """The CPU bandwidth probe, for jobs that run on the CPU (GPUs use the config table)."""
    if PLAN.eval_on_gpu(wildcards.backend):
        return []
    return ["results/eval/bandwidth/probe.json"]


def get_eval_bandwidth(wildcards, input):
    return {
        "probe": input.probe[0] if input.probe else None,
        "cache_dir": "results/eval/bandwidth",
        "table": PLAN.bandwidth_table,
        **EVAL["bandwidth_probe"],
    }


def get_sweep_ggufs(wildcards):
    return {
        v: PLAN.gguf(wildcards.model, v) for v in PLAN.gguf_variants(wildcards.model)
    }


def get_placement_gguf(wildcards):
    return PLAN.gguf(wildcards.model, PLAN.placement_variant)


def get_placement(wildcards):
    return PLAN.placement(wildcards.placement)


def get_placement_threads(wildcards):
    return PLAN.placement(wildcards.placement).threads or EVAL["threads"]


def get_placement_gpus(wildcards):
    return PLAN.placement(wildcards.placement).gpus


def get_placement_hosts(wildcards):
    return PLAN.placement(wildcards.placement).hosts


def get_placement_partition(wildcards):
    placement = PLAN.placement(wildcards.placement)
    return PLAN.partition(placement.gpus, placement.hosts)


def placement_estimate(wildcards):
    return list(PLAN.placement_estimate(wildcards.placement))


def placement_resources():
    """A placement job's resources: planned as a llama.cpp benchmark; several hosts are a job
    of that many nodes (one task each, the first runs the evaluation), in
    slurm.multinode_partition where set."""
    resources = job_resources(placement_estimate, gpus=get_placement_gpus)
    resources.update(
        slurm_partition=get_placement_partition,
        nodes=get_placement_hosts,
        tasks=get_placement_hosts,
    )
    return resources


def get_finetune_settings(wildcards):
    return PLAN.finetune_settings(wildcards.model)


def get_finetune_params(group):
    """Params function: the settings of one fine-tune step (data, train, merge or compare):
    each step gets only the keys it uses, so e.g. a new comparison batch size reruns the
    comparison, not the training."""

    def params(wildcards):
        return get_finetune_settings(wildcards).group(group)

    return params


def get_finetune_data_files(wildcards):
    """The user's data files, when the model has them (none for the built-in task)."""
    s = get_finetune_settings(wildcards)
    files = {"train_file": s.train_file, "heldout_file": s.heldout_file}
    return {k: v for k, v in files.items() if v is not None}


def get_finetune_gpus(wildcards):
    """GPUs per node: the configured processes per node where training runs on CUDA."""
    s = get_finetune_settings(wildcards)
    return s.gpus_per_node if s.wants_cuda else 0


def get_finetune_gpus_per_node(wildcards):
    return get_finetune_settings(wildcards).gpus_per_node


def get_compare_gpus(wildcards):
    return 1 if get_finetune_settings(wildcards).device == "cuda" else 0


def get_finetune_nodes(wildcards):
    return get_finetune_settings(wildcards).nodes


def get_merge_dtype(wildcards):
    return get_finetune_settings(wildcards).group("merge")["merged_dtype"]


def get_modules(kind):
    """Environment modules of a rule: the Python stack, plus llama.cpp's for its tools."""
    return PLAN.modules(kind)


# ---- aggregate_stats (workflow/rules/report.smk) ------------------------------------------
# The report reads records only: every file it reads is an input, named by the rule that writes
# it (rules.<rule>.output / .benchmark), with the identity of its job in params.jobs.
def _stats_files(job):
    """(record, benchmark) of a job, from its rule's declared output and benchmark."""
    proxy = getattr(rules, job.rule)
    record = getattr(proxy.output, job.record_output)
    return record.format(**job.wildcards), proxy.benchmark.format(**job.wildcards)


def get_stats_eval_jsons(wildcards):
    """Every evaluation's JSON: the summary has one row per expected combination."""
    return [
        rules.evaluate.output.result.format(model=m, variant=v, backend=b)
        for m, v, b in PLAN.eval_jsons()
    ]


def get_stats_task_jsons(wildcards):
    """Every task record (evaluate.tasks; none when it is off)."""
    return [
        rules.evaluate_tasks.output.result.format(model=m, variant=v, backend=b)
        for m, v, b in PLAN.task_jsons()
    ]


def get_stats_weights(wildcards):
    """What each evaluation loaded, by its record: the GGUF's, or the model folder's manifest."""
    return [_stats_files(job)[0] for job in PLAN.weights_jobs()]


def get_stats_records(wildcards):
    return [_stats_files(job)[0] for job in PLAN.stats_jobs()]


def get_stats_benchmarks(wildcards):
    return [_stats_files(job)[1] for job in PLAN.stats_jobs()]


def get_stats_job_ids(wildcards):
    return [[job.rule, job.model, job.target] for job in PLAN.stats_jobs()]


def get_stats_placements(wildcards):
    return PLAN.placement_outputs()


def get_stats_loss_csvs(wildcards):
    """The fine-tune loss curve of each fine-tuned base model (params.loss_models)."""
    return [
        rules.finetune.output.loss.format(model=base) for base in PLAN.finetune_bases
    ]


# ---- Estimates and resources ---------------------------------------------------------------
# Each job's mem_mb, runtime and GPUs come from the estimator (llmpipe.resources ->
# llmpipe.estimate), evaluated when the job is ready to run, from the model's config.json:
# memory is the predicted peak x margin (RAM-disk bytes included), runtime x margin, and a
# retried job (profile `retries:`) gets `attempt` times both. The same [step, options] goes to
# the job's script (params.estimate), which records the prediction next to what it measured.
def estimate(step, **options):
    """Estimate function of a rule: wildcards -> [step, options]; an option's value may be a
    function of the wildcards (e.g. quant=get_quant)."""

    def of(wildcards):
        return [
            step,
            {k: v(wildcards) if callable(v) else v for k, v in options.items()},
        ]

    return of


def eval_estimate(kind):
    """Estimate function of an evaluation job: shard, reference or quality."""

    def of(wildcards):
        variant = getattr(wildcards, "variant", None)
        return list(PLAN.eval_estimate(wildcards.backend, variant, kind))

    return of


def tasks_estimate(wildcards):
    """Estimate function of a task job (evaluate_tasks)."""
    return list(PLAN.tasks_estimate(wildcards.backend, wildcards.variant))


def download_estimate(wildcards):
    return ["download", res.download_options(config["models"][wildcards.model])]


def finetune_estimate(wildcards):
    train = f"results/finetune/{wildcards.model}/data/train.jsonl"
    return ["finetune", ft.plan_options(get_finetune_settings(wildcards), train)]


def compare_estimate(wildcards):
    return list(PLAN.compare_estimate(wildcards.model))


def job_resources(estimate_of, gpus="planned", processes=None):
    """The resources of a rule's jobs from its estimate function: mem_mb and runtime, and
    unless ``gpus`` is None (a CPU-only rule) gres and slurm_partition. ``gpus`` "planned":
    the estimator's count, one at least where the options' hw is a GPU; or a function of the
    wildcards. ``processes`` (a function of the wildcards) multiplies the memory: processes
    per node that each hold what the estimate predicts for one."""

    def plan(wildcards, threads, attempt):
        step, options = estimate_of(wildcards)
        return PLAN.request(wildcards.model, step, options, threads, attempt)

    def mem_mb(wildcards, threads, attempt):
        per_process = plan(wildcards, threads, attempt).mem_mb
        return per_process * (processes(wildcards) if processes else 1)

    def runtime(wildcards, threads, attempt):
        return plan(wildcards, threads, attempt).runtime_min

    def count(wildcards, threads):
        if callable(gpus):
            return gpus(wildcards)
        if estimate_of(wildcards)[1].get("hw", "cpu") == "cpu":
            return 0
        return max(1, plan(wildcards, threads, 1).gpus)

    def gres(wildcards, threads):
        return PLAN.gres(count(wildcards, threads))

    def slurm_partition(wildcards, threads):
        return PLAN.partition(count(wildcards, threads))

    resources = {"mem_mb": mem_mb, "runtime": runtime}
    if gpus is not None:
        resources.update(gres=gres, slurm_partition=slurm_partition)
    return resources


def gpu_resources(gpus):
    """gres and slurm_partition of a rule with a fixed GPU count (no estimate)."""
    return {"gres": PLAN.gres(gpus), "slurm_partition": PLAN.partition(gpus)}
