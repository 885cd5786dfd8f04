# Shared by all rules: the model table, wildcard constraints, input functions, resources.
# Parsed on every run and inside every job: keep it light (no torch, no transformers).
import inspect
import os
import re
import sys
import types

SRC = os.path.join(workflow.basedir, "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
# Jobs (local or Slurm) run the scripts with their own Python: let them find the package too.
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if SRC not in _paths:
    os.environ.update(PYTHONPATH=os.pathsep.join([SRC, *_paths]))

from llmpipe import architectures as arch  # noqa: E402
from llmpipe import config as cfg  # noqa: E402
from llmpipe import imatrix as imat  # noqa: E402
from llmpipe import resources as res  # noqa: E402
from llmpipe.finetune import settings as ft  # noqa: E402
from snakemake.common import overwrite_function_params  # noqa: E402

cfg.validate(config, workflow.source_path("../schemas/config.schema.yaml"))
cfg.check(config)
ft.check(config)

# Base models are downloaded; a tuned model (<base>-ft, finetune.enabled_for) comes from the
# finetune stage. Both kinds go through convert_to_gguf, quantize and evaluate.
BASE_MODELS = cfg.model_ids(config)
TUNED_MODELS = ft.tuned_models(config)
MODELS = BASE_MODELS + TUNED_MODELS
REFERENCE = cfg.reference_variant(config)
# Quantized variants: the plain types, then the <TYPE>-imat ones (quantize.imatrix.types).
QUANTS = cfg.quant_variants(config)
# Which models the pinned llama.cpp can take (llmpipe.architectures, from each config.json):
# the others keep every step that needs no GGUF; their GGUF steps are not scheduled.
TUNED_BASES = {ft.tuned_id(base): base for base in ft.base_models(config)}
GGUF_SUPPORT = arch.plan(
    config["models"],
    TUNED_BASES,
    hub_cache_dir=config["hub"]["cache_dir"],
)
GGUF_MODELS = [m for m in MODELS if GGUF_SUPPORT[m].supported]
GGUF_NOTES = {
    m: (
        s.reason
        if s.supported
        else f"not converted: {s.reason} (force with models.{TUNED_BASES.get(m, m)}.force_gguf: true)"
    )
    for m, s in GGUF_SUPPORT.items()
    if s.reason
}
# summary.md keeps the lasting ones (not converted, or forced), not "not downloaded yet"
GGUF_SUMMARY_NOTES = {
    m: note
    for m, note in GGUF_NOTES.items()
    if not GGUF_SUPPORT[m].supported
    or config["models"][TUNED_BASES.get(m, m)].get("force_gguf")
}
if workflow.is_main_process:
    for _model, _note in GGUF_NOTES.items():
        print(f"{_model}: GGUF steps {_note}", file=sys.stderr)


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    quant="|".join(map(re.escape, QUANTS)) if QUANTS else "(?!)",


def get_model_spec(wildcards):
    return config["models"][wildcards.model]


def get_gguf_variants(model):
    """The GGUF variants of a model: the reference and every quantization, or none."""
    if not GGUF_SUPPORT[model].supported:
        return []
    return [REFERENCE, *cfg.quant_variants(config, model)]


def get_reference_gguf(wildcards):
    return f"results/gguf/{wildcards.model}/{wildcards.model}-{REFERENCE}.gguf"


def get_final_outputs():
    """Everything `rule all` asks for, from the config."""
    outputs = []
    for model in MODELS:
        outputs.append(f"results/staged/{model}/stage.json")
        for variant in get_gguf_variants(model):
            outputs.append(f"results/gguf/{model}/{model}-{variant}.gguf")
            outputs.append(f"results/gguf/{model}/{model}-{variant}.json")
    outputs.extend(get_eval_outputs())
    outputs.extend(get_finetune_outputs())
    outputs.extend(STATS_OUTPUTS)
    return outputs


# ---- Resources ---------------------------------------------------------------------------
# mem_mb, runtime and GPU count of every job come from the estimator (llmpipe.resources ->
# llmpipe.estimate; standard library only), evaluated per job when it is ready to run, from the
# model's downloaded config.json (a `dir` model's own before its download). Memory is the
# predicted peak x 1.25 (RAM-disk bytes included), runtime x 1.5; a retried job (profile
# `retries:`) gets `attempt` times both. Before a config.json exists (a dry run on a fresh
# folder) a conservative fallback for a 7B model is shown: llmpipe.resources.FALLBACK.
#
# For any rule:  mem_mb=get_mem_mb(STEP, **options), runtime=get_runtime(STEP, **options),
# and for GPU rules the count: get_gpus(STEP, **options).
# STEP: download, cache_to_shm, convert_to_gguf, imatrix, quantize, evaluate_llama_cpp,
# evaluate_transformers, finetune, merge_lora. Options are keyword arguments of the estimator
# function (llmpipe.estimate.download/stage/convert/imatrix/quantize/evaluate_llama_cpp/
# evaluate_transformers/finetune/merge); a value may be a function of the wildcards;
# hw="cpu" or "v100"; `threads` is the rule's own. E.g.
# get_mem_mb("evaluate_llama_cpp", quant=get_variant, hw="cpu"),
# get_mem_mb("finetune", method="lora", hw="v100", steps=100). The job's script records the
# same prediction next to what it measured: llmpipe.resources.Usage.


def get_resource_plan(step, wildcards, threads, attempt, options):
    """The estimator's prediction and request for one job (llmpipe.resources.Plan)."""
    opts = {k: v(wildcards) if callable(v) else v for k, v in options.items()}
    if step == "download":
        spec = config["models"][wildcards.model]
        opts = {**res.download_options(spec), **opts}
        config_json = res.download_config(spec, wildcards.model)
    else:
        config_json = res.model_config(wildcards.model, MODELS)
    opts.setdefault("threads", threads)
    return res.checked_request(wildcards.model, step, config_json, attempt, **opts)


def get_mem_mb(step, **options):
    """Resources callable: host memory (MiB) of a `step` job, RAM-disk bytes included."""

    def mem_mb(wildcards, input, threads, attempt):
        return get_resource_plan(step, wildcards, threads, attempt, options).mem_mb

    return _fixed_signature(mem_mb)


def get_runtime(step, **options):
    """Resources callable: wall-clock minutes of a `step` job."""

    def runtime(wildcards, input, threads, attempt):
        return get_resource_plan(step, wildcards, threads, attempt, options).runtime_min

    return _fixed_signature(runtime)


def get_gpus(step, **options):
    """Resources callable: GPUs a `step` job needs (0 on the CPU)."""

    def gpus(wildcards, input, threads, attempt):
        return get_resource_plan(step, wildcards, threads, 1, options).gpus

    return _fixed_signature(gpus)


def get_quant(wildcards):
    return wildcards.quant


# ---- Evaluation (workflow/rules/evaluate.smk) --------------------------------------------
# Variants per backend: llama.cpp evaluates the reference GGUF and every quantization, the
# transformers backend the Hugging Face folder ("hf"). A stage that adds models to evaluate
# (fine-tuning) extends EVAL_VARIANTS and get_eval_model. The first variant of each backend
# is the quality reference of that backend (F16 GGUF; HF folder).
EVAL = config["evaluate"]
EVAL_BACKENDS = list(EVAL["backends"])
EVAL_VARIANTS = {"llama.cpp": [REFERENCE, *QUANTS], "transformers": ["hf"]}
EVAL_SECTION = {"llama.cpp": "llama_cpp", "transformers": "transformers"}
EVAL_PROMPT_LIST = cfg.read_prompts(config["prompts"])
EVAL_PROMPTS = len(EVAL_PROMPT_LIST)
EVAL_PROMPT_TOKENS = cfg.prompt_tokens_bound(EVAL_PROMPT_LIST)


wildcard_constraints:
    backend="|".join(map(re.escape, EVAL_SECTION)),
    variant="|".join(map(re.escape, {v for vs in EVAL_VARIANTS.values() for v in vs})),


def get_eval_outputs():
    """The eval JSONs and texts of every model x backend x variant (+ the sweep tables)."""
    outputs = []
    for model in MODELS:
        for backend in EVAL_BACKENDS:
            for variant in get_model_eval_variants(model, backend):
                outputs.append(f"results/eval/{model}/{variant}-{backend}.json")
                outputs.append(f"results/eval/{model}/{variant}-{backend}.texts.jsonl")
        if (
            EVAL["sweep"]["enabled"]
            and "llama.cpp" in EVAL_BACKENDS
            and model in GGUF_MODELS
        ):
            outputs.append(f"results/eval/{model}/sweep-llama.cpp.tsv")
    return outputs


def get_model_eval_variants(model, backend):
    """The variants of ``model`` that ``backend`` evaluates (no GGUF ones without GGUF)."""
    if backend == "llama.cpp":
        return get_gguf_variants(model)
    return EVAL_VARIANTS[backend]


def get_eval_reference(backend):
    return EVAL_VARIANTS[backend][0]


def get_eval_model(wildcards):
    """The model files an evaluation job loads (named inputs; `hf` sizes the FLOPs)."""
    model, variant = wildcards.model, getattr(wildcards, "variant", None)
    if variant is None:
        variant = get_eval_reference(wildcards.backend)
    hf = f"results/models/{model}/hf"
    if wildcards.backend == "transformers":
        return {
            "model": hf,
            "manifest": f"results/models/{model}/manifest.json",
            "staged": f"results/staged/{model}/stage.json",
            "hf": hf,
        }
    return {
        "model": f"results/gguf/{model}/{model}-{variant}.gguf",
        "record": f"results/gguf/{model}/{model}-{variant}.json",
        "hf": hf,
    }


def get_eval_quality(wildcards):
    """The reference's quality is its own perplexity (KLD 0); others are compared with it."""
    m, v, b = wildcards.model, wildcards.variant, wildcards.backend
    if v == get_eval_reference(b):
        return f"results/eval/{m}/reference-{b}.json"
    return f"results/eval/{m}/quality/{v}-{b}.json"


def get_eval_settings(wildcards):
    return EVAL[EVAL_SECTION[wildcards.backend]]


def is_eval_on_gpu(backend):
    if backend == "llama.cpp":
        return EVAL["llama_cpp"]["n_gpu_layers"] != 0
    return EVAL["transformers"]["device"] == "cuda"


def get_eval_probe(wildcards):
    """The CPU bandwidth probe, for jobs that run on the CPU (GPUs use the config table)."""
    return (
        []
        if is_eval_on_gpu(wildcards.backend)
        else ["results/eval/bandwidth/probe.json"]
    )


def get_eval_bandwidth(wildcards, input):
    return {
        "probe": input.probe[0] if input.probe else None,
        "cache_dir": "results/eval/bandwidth",
        "table": EVAL["peak_bandwidth_gb_s"],
        **EVAL["bandwidth_probe"],
    }


def get_sweep_ggufs(wildcards):
    m = wildcards.model
    return {v: f"results/gguf/{m}/{m}-{v}.gguf" for v in get_gguf_variants(m)}


def get_eval_chunks():
    """Perplexity chunks (from the text's size, ~4 bytes per token, before it is tokenized)."""
    n_ctx, chunks = EVAL["perplexity"]["n_ctx"], EVAL["perplexity"]["chunks"]
    try:
        approx = max(1, os.path.getsize(EVAL["text"]) // 4 // n_ctx)
    except OSError:
        approx = 1
    return min(chunks, approx) if chunks else approx


def get_eval_estimate(wildcards, kind):
    """Estimator step and options of an evaluation job: kind is shard, reference or quality.

    Generation (shard) jobs: the longest prompt's tokens (bounded from its size) and
    max_new_tokens; perplexity jobs: one chunk of perplexity.n_ctx tokens, logits for each.
    """
    backend = wildcards.backend
    gpu = is_eval_on_gpu(backend)
    ppl = kind != "shard"
    chunk = EVAL["perplexity"]["n_ctx"]
    opts = {
        "hw": "v100" if gpu else "cpu",
        "staged": True,
        "samples": (
            get_eval_chunks() if ppl else -(-EVAL_PROMPTS // config["farm"]["shards"])
        ),
        "new_tokens": 1 if ppl else EVAL["sampling"]["max_new_tokens"],
        "seq_len": chunk - 1 if ppl else EVAL_PROMPT_TOKENS,
    }
    if backend == "llama.cpp":
        variant = getattr(wildcards, "variant", get_eval_reference(backend))
        opts.update(
            quant=variant,
            kv_type=EVAL["llama_cpp"]["kv_type"],
            n_ctx=chunk if ppl else EVAL["llama_cpp"]["n_ctx"],
            flash_attn=EVAL["llama_cpp"]["flash_attn"],
            # logits kept per pass: the scored second half of a chunk (llama-perplexity's way)
            outputs=chunk - 1 - chunk // 2 if ppl else 1,
            kld_chunks=get_eval_chunks() if kind == "quality" else 0,
        )
        return "evaluate_llama_cpp", opts
    dtype = EVAL["transformers"]["dtype"]
    if dtype == "auto":
        dtype = "float16" if gpu else "float32"
    opts.update(
        dtype=dtype,
        batch=1 if ppl else EVAL["transformers"]["batch_size"],
        full_logits=ppl,
    )
    return "evaluate_transformers", opts


def get_eval_estimate_param(kind):
    """Params callable: [step, options] of the job's prediction, recorded by its script next
    to what it measured (llmpipe.resources.Usage)."""

    def estimate(wildcards):
        return list(get_eval_estimate(wildcards, kind))

    return _fixed_signature(estimate)


def get_eval_mem_mb(kind):
    def mem_mb(wildcards, input, threads, attempt):
        step, opts = get_eval_estimate(wildcards, kind)
        return get_resource_plan(step, wildcards, threads, attempt, opts).mem_mb

    return _fixed_signature(mem_mb)


def get_eval_runtime(kind):
    def runtime(wildcards, input, threads, attempt):
        step, opts = get_eval_estimate(wildcards, kind)
        return get_resource_plan(step, wildcards, threads, attempt, opts).runtime_min

    return _fixed_signature(runtime)


def get_eval_gpus(kind):
    def gpus(wildcards, input, threads, attempt):
        if not is_eval_on_gpu(wildcards.backend):
            return 0
        step, opts = get_eval_estimate(wildcards, kind)
        return max(1, get_resource_plan(step, wildcards, threads, 1, opts).gpus)

    return _fixed_signature(gpus)


# ---- Importance matrix (workflow/rules/gguf.smk: imatrix, quantize) ------------------------
# One matrix per model (llama-imatrix on the reference GGUF), used by every <TYPE>-imat
# quantization of it; the calibration text is quantize.imatrix.text, or with null the part of
# evaluate.text after the evaluation's perplexity chunks (llmpipe.imatrix).
IMATRIX = config["quantize"]["imatrix"]
if workflow.is_main_process:  # once per run, not again inside every job
    for _warning in imat.planning_warnings(config):
        print(f"warning: {_warning}", file=sys.stderr)


def get_quant_type(wildcards):
    """The llama.cpp type of a variant: Q4_K_M for both Q4_K_M and Q4_K_M-imat."""
    return cfg.split_variant(wildcards.quant)[0]


def get_quantize_input(wildcards):
    """The reference GGUF, and for a -imat variant the model's importance matrix."""
    inputs = {"gguf": get_reference_gguf(wildcards)}
    if cfg.split_variant(wildcards.quant)[1]:
        inputs["imatrix"] = f"results/gguf/{wildcards.model}/{wildcards.model}.imatrix"
    return inputs


def get_imatrix_input(wildcards):
    """The reference GGUF, the evaluation text (its chunks are cut off or checked against)
    and the user's calibration text when there is one."""
    inputs = {"gguf": get_reference_gguf(wildcards), "eval_text": EVAL["text"]}
    if IMATRIX["text"] is not None:
        inputs["text"] = IMATRIX["text"]
    return inputs


def is_imatrix_on_gpu():
    return EVAL["llama_cpp"]["n_gpu_layers"] != 0


def get_imatrix_chunks():
    """Chunks llama-imatrix will read, at most quantize.imatrix.chunks (from the text's size,
    ~4 bytes per token; the default text is what follows the evaluation chunks)."""
    n_ctx = IMATRIX["n_ctx"]
    try:
        if IMATRIX["text"] is None:
            used = get_eval_chunks() * EVAL["perplexity"]["n_ctx"] * 4
            size = os.path.getsize(EVAL["text"]) - used
        else:
            size = os.path.getsize(IMATRIX["text"])
    except OSError:
        size = 0
    return max(1, min(IMATRIX["chunks"], size // 4 // n_ctx))


IMATRIX_ESTIMATE = {
    "source": REFERENCE,
    "hw": "v100" if is_imatrix_on_gpu() else "cpu",
    "n_ctx": IMATRIX["n_ctx"],
    "chunks": get_imatrix_chunks(),
}


def get_imatrix_gpus(wildcards, input, threads, attempt):
    """GPUs of the imatrix job: as a llama.cpp evaluation, one at least when layers go there."""
    if not is_imatrix_on_gpu():
        return 0
    plan = get_resource_plan("imatrix", wildcards, threads, 1, IMATRIX_ESTIMATE)
    return max(1, plan.gpus)


# ---- Statistics (workflow/rules/report.smk) ------------------------------------------------
STATS_OUTPUTS = ["results/stats/summary.csv", "results/stats/summary.md"]
STATS_EVAL_JSON = re.compile(
    r"results/eval/([^/]+)/(.+)-(llama\.cpp|transformers)\.json"
)


def get_stats_eval_jsons(wildcards):
    """Every expected eval JSON (model x variant x backend): the evaluate stage's own list, so
    the summary has exactly one row per expected combination."""
    return [p for p in get_eval_outputs() if STATS_EVAL_JSON.fullmatch(p)]


def get_stats_records(wildcards):
    """The records of the jobs that measured their resources (download or merge_lora,
    cache_to_shm, convert_to_gguf, imatrix, quantize, finetune, evaluate_reference,
    evaluate_quality),
    for every model and every evaluated variant."""
    records = []
    for model in MODELS:
        records.append(f"results/models/{model}/manifest.json")
        records.append(f"results/staged/{model}/stage.json")
        variants = get_gguf_variants(model)
        for variant in variants:
            records.append(f"results/gguf/{model}/{model}-{variant}.json")
        if any(cfg.split_variant(v)[1] for v in variants):
            records.append(f"results/gguf/{model}/{model}.imatrix.json")
    for path in get_stats_eval_jsons(wildcards):
        model, variant, backend = STATS_EVAL_JSON.fullmatch(path).groups()
        if backend == "llama.cpp":
            records.append(f"results/gguf/{model}/{model}-{variant}.json")
        # the perplexity jobs' records (the generation shards' are in the eval JSONs)
        records.append(f"results/eval/{model}/reference-{backend}.json")
        if variant != get_eval_reference(backend):
            records.append(f"results/eval/{model}/quality/{variant}-{backend}.json")
    finetune_outputs = globals().get("get_finetune_outputs")
    # the finetune jobs' metrics carry their resources too
    if finetune_outputs is not None:
        names = [os.path.basename(p) for p in finetune_outputs()]
        records += [
            p
            for p, n in zip(finetune_outputs(), names)
            if n in ("metrics.json", "comparison.json")
        ]
    return list(dict.fromkeys(records))


def get_stats_loss_csvs(wildcards):
    """Fine-tuning loss curves, where a fine-tune stage is configured (else none)."""
    finetune_outputs = globals().get("get_finetune_outputs")
    if finetune_outputs is None:
        return []
    return [p for p in finetune_outputs() if os.path.basename(p) == "loss.csv"]


def get_stats_loss_map(wildcards):
    """{model: loss.csv} (results/finetune/{model}/loss.csv)."""
    return {p.split("/")[2]: p for p in get_stats_loss_csvs(wildcards)}


def get_stats_eval_estimates(wildcards):
    """{eval JSON: [estimator step, options]} as the evaluation shards' resources use them, so
    the summary's predicted memory is the prediction those jobs were given."""
    out = {}
    get_estimate = globals().get("get_eval_estimate")
    for path in get_stats_eval_jsons(wildcards) if get_estimate else []:
        model, variant, backend = STATS_EVAL_JSON.fullmatch(path).groups()
        wc = types.SimpleNamespace(model=model, variant=variant, backend=backend)
        step, options = get_estimate(wc, "shard")
        out[path] = [step, options]
    return out


# ---- Fine-tuning (workflow/rules/finetune.smk) ---------------------------------------------
# finetune.enabled_for lists base models; each one's settings are finetune.defaults overridden
# by finetune.models.<base> (llmpipe.finetune.settings). Rules pass each step only the keys it
# uses, so e.g. a new comparison batch size reruns the comparison, not the training.
FINETUNE_BASES = ft.base_models(config)
FINETUNE_BASE_REGEX = ft.id_regex(FINETUNE_BASES)
BASE_MODEL_REGEX = ft.id_regex(BASE_MODELS)


def get_finetune_settings(wildcards):
    return ft.resolve(config, wildcards.model)


def get_finetune_params(group):
    """Params callable: the settings of one step (data, train, merge or compare)."""

    def params(wildcards):
        return get_finetune_settings(wildcards).group(group)

    return _fixed_signature(params)


def get_finetune_data_files(wildcards):
    """The user's data files, when the model has them (none for the built-in task)."""
    s = get_finetune_settings(wildcards)
    files = {"train_file": s.train_file, "heldout_file": s.heldout_file}
    return {k: v for k, v in files.items() if v is not None}


def get_finetune_outputs():
    """Adapter, loss curve, metrics, base-vs-tuned table (+ GGUF adapter) per tuned model."""
    outputs = []
    for model in FINETUNE_BASES:
        outputs += [
            f"results/finetune/{model}/adapter",
            f"results/finetune/{model}/loss.csv",
            f"results/finetune/{model}/loss.png",
            f"results/finetune/{model}/metrics.json",
            f"results/finetune/{model}/comparison.csv",
            f"results/finetune/{model}/comparison.md",
            f"results/finetune/{model}/comparison.json",
        ]
        if ft.resolve(config, model).adapter_gguf and model in GGUF_MODELS:
            outputs.append(f"results/finetune/{model}/adapter-F16.gguf")
    return outputs


def get_finetune_plan(wildcards, input, threads, attempt):
    """The estimator's prediction for a finetune job (llmpipe.estimate.finetune)."""
    opts = ft.plan_options(get_finetune_settings(wildcards), input.train)
    return get_resource_plan("finetune", wildcards, threads, attempt, opts)


def get_finetune_mem_mb(wildcards, input, threads, attempt):
    """Host memory of one node: the estimate for one process x the processes per node."""
    s = get_finetune_settings(wildcards)
    return (
        get_finetune_plan(wildcards, input, threads, attempt).mem_mb * s.gpus_per_node
    )


def get_finetune_runtime(wildcards, input, threads, attempt):
    return get_finetune_plan(wildcards, input, threads, attempt).runtime_min


def get_finetune_gpus(wildcards):
    """GPUs per node: the configured processes per node where training runs on CUDA."""
    s = get_finetune_settings(wildcards)
    return s.gpus_per_node if s.wants_cuda else 0


def get_finetune_nodes(wildcards):
    return get_finetune_settings(wildcards).nodes


def get_merge_dtype(wildcards):
    return get_finetune_settings(wildcards).group("merge")["merged_dtype"]


def get_compare_estimate(wildcards):
    """[step, options]: compare_finetune plans as a transformers evaluation of the held-out
    set (llmpipe.finetune.settings.compare_estimate_options)."""
    heldout = f"results/finetune/{wildcards.model}/data/heldout.jsonl"
    options = ft.compare_estimate_options(get_finetune_settings(wildcards), heldout)
    return ["evaluate_transformers", options]


def get_compare_mem_mb(wildcards, input, threads, attempt):
    step, options = get_compare_estimate(wildcards)
    return get_resource_plan(step, wildcards, threads, attempt, options).mem_mb


def get_compare_runtime(wildcards, input, threads, attempt):
    step, options = get_compare_estimate(wildcards)
    return get_resource_plan(step, wildcards, threads, attempt, options).runtime_min


def get_compare_gpus(wildcards):
    return 1 if get_finetune_settings(wildcards).device == "cuda" else 0


# ---- Slurm placement and environment modules (profiles/slurm) ----------------------------------
def get_modules(kind):
    """Environment modules of a rule of ``kind``, a key of config `envmodules`: the Python
    stack (`transformers`) for every rule, plus `llama_cpp`'s for the llama.cpp rules.
    """
    if kind not in config["envmodules"]:
        raise ValueError(
            f"get_modules: '{kind}' is no key of config envmodules "
            f"({', '.join(config['envmodules'])})"
        )
    modules = list(config["envmodules"]["transformers"])
    if kind != "transformers":
        modules += config["envmodules"][kind]
    return modules


def _call_with(fn, wildcards, input, threads, attempt):
    """Call a resource function with the arguments it declares (Snakemake's own convention)."""
    import inspect

    given = dict(wildcards=wildcards, input=input, threads=threads, attempt=attempt)
    names = inspect.signature(fn).parameters
    return fn(**{name: given[name] for name in names if name in given})


def get_gres(gpus):
    """--gres for a rule's GPU count (a number or a resource function): gpu:<type>:<N>, or ""
    (no gres at all) when it needs none. slurm.gpu_type is the one place the type is set.
    """

    def gres(wildcards, input, threads, attempt):
        n = (
            _call_with(gpus, wildcards, input, threads, attempt)
            if callable(gpus)
            else gpus
        )
        return f"gpu:{config['slurm']['gpu_type']}:{n}" if n else ""

    return _fixed_signature(gres)


def get_partition(gpus):
    """The GPU partition when the rule needs GPUs; else "" (the site's default partition)."""

    def partition(wildcards, input, threads, attempt):
        n = (
            _call_with(gpus, wildcards, input, threads, attempt)
            if callable(gpus)
            else gpus
        )
        return config["slurm"]["gpu_partition"] if n else ""

    return _fixed_signature(partition)


# ---- Planner speed ---------------------------------------------------------------------------
# Snakemake reads the signature of an input, params or resources function for every job it
# plans (inspect.signature, ~70 us; thousands of calls in a cluster-sized dry run). The
# functions here state theirs once, through Snakemake's own hook for that.
def _fixed_signature(fn):
    overwrite_function_params(fn, inspect.signature(fn).parameters)
    return fn


for _name, _fn in list(globals().items()):
    if _name.startswith("get_") and inspect.isfunction(_fn):
        _fixed_signature(_fn)
