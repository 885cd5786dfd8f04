# aggregate_stats: every eval JSON, GGUF record and job resource record of the run in one table
# (results/stats/summary.csv), one page (summary.md: the seed's "??" figures filled in, the
# quality table), the resources predicted vs measured (resources.csv) and plots. Bookkeeping on
# the head node: `snakemake --report report.html` then shows them.
#
# The report reads records only: every file it reads is an input below, named by the rule that
# writes it (rules.<rule>.output / .benchmark), with the identity of its job in params.jobs.
# The job records the report reads: rule -> the output that is its record (the eval JSONs'
# own jobs, evaluate_shard, are read through the eval JSON: its most memory-hungry shard).
STATS_RECORD_OUTPUT = {
    "download": "manifest",
    "merge_lora": "manifest",
    "cache_to_shm": "record",
    "convert_to_gguf": "record",
    "quantize": "record",
    "imatrix": "record",
    "evaluate_reference": "result",
    "evaluate_quality": "result",
    "finetune": "metrics",
    "compare_finetune": "record",
}


def get_stats_evaluations():
    """(model, variant, backend) of every evaluation, one summary row each."""
    return [
        (model, variant, backend)
        for model in MODELS
        for backend in EVAL_BACKENDS
        for variant in get_model_eval_variants(model, backend)
    ]


def get_stats_eval_jsons(wildcards):
    return [
        rules.evaluate.output.result.format(model=m, variant=v, backend=b)
        for m, v, b in get_stats_evaluations()
    ]


def _model_job(model):
    """The job that made a model's folder: its download, or a tuned model's merge."""
    if model in TUNED_BASES:
        return ("merge_lora", model, "", {"model": TUNED_BASES[model]})
    return ("download", model, "", {"model": model})


def _gguf_job(model, variant):
    if variant == REFERENCE:
        return (
            "convert_to_gguf",
            model,
            variant,
            {"model": model, "reference": variant},
        )
    return ("quantize", model, variant, {"model": model, "quant": variant})


def get_stats_weights(wildcards):
    """What each evaluation loaded, by its record: the GGUF's, or the model folder's manifest."""
    jobs = [
        _gguf_job(m, v) if b == "llama.cpp" else _model_job(m)
        for m, v, b in get_stats_evaluations()
    ]
    return [_stats_files(job)[0] for job in jobs]


def get_stats_jobs():
    """(rule, model, target, wildcards) of every job with a resource record: per model its
    folder, staging, GGUFs and imatrix; then the perplexity jobs of every evaluation; then the
    fine-tunes and their comparisons."""
    jobs = []
    for model in MODELS:
        jobs.append(_model_job(model))
        jobs.append(("cache_to_shm", model, "", {"model": model}))
        variants = get_gguf_variants(model)
        jobs += [_gguf_job(model, v) for v in variants]
        if any(cfg.split_variant(v)[1] for v in variants):
            jobs.append(("imatrix", model, "", {"model": model}))
    for model in MODELS:
        for backend in EVAL_BACKENDS:
            reference = get_eval_reference(backend)
            if not get_model_eval_variants(model, backend):
                continue
            wc = {"model": model, "backend": backend}
            jobs.append(("evaluate_reference", model, f"{reference}-{backend}", wc))
            jobs += [
                ("evaluate_quality", model, f"{v}-{backend}", {**wc, "variant": v})
                for v in get_model_eval_variants(model, backend)
                if v != reference
            ]
    for base in FINETUNE_BASES:
        jobs.append(("finetune", ft.tuned_id(base), "", {"model": base}))
        jobs.append(("compare_finetune", base, "", {"model": base}))
    return jobs


def _stats_files(job):
    """(record, benchmark) of a job, from its rule's declared output and benchmark."""
    rule_name, _model, _target, wildcards = job
    proxy = getattr(rules, rule_name)
    record = getattr(proxy.output, STATS_RECORD_OUTPUT[rule_name]).format(**wildcards)
    return record, proxy.benchmark.format(**wildcards)


def get_stats_records(wildcards):
    return [_stats_files(job)[0] for job in get_stats_jobs()]


def get_stats_benchmarks(wildcards):
    return [_stats_files(job)[1] for job in get_stats_jobs()]


def get_stats_job_ids(wildcards):
    return [list(job[:3]) for job in get_stats_jobs()]


def get_stats_loss_csvs(wildcards):
    """The fine-tune loss curve of each model in FINETUNE_BASES (params.loss_models)."""
    return [rules.finetune.output.loss.format(model=base) for base in FINETUNE_BASES]


rule aggregate_stats:
    input:
        evals=get_stats_eval_jsons,
        weights=get_stats_weights,
        records=get_stats_records,
        benchmarks=get_stats_benchmarks,
        losses=get_stats_loss_csvs,
    output:
        summary=report(
            "results/stats/summary.csv",
            caption="../report/summary_csv.rst",
            category="Statistics",
        ),
        markdown=report(
            "results/stats/summary.md",
            caption="../report/summary_md.rst",
            category="Statistics",
        ),
        resources=report(
            "results/stats/resources.csv",
            caption="../report/resources.rst",
            category="Resources",
        ),
        plots=report(
            directory("results/stats/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Plots",
            labels={"figure": "{name}"},
        ),
        provenance="results/stats/provenance.json",
    log:
        "logs/aggregate_stats/aggregate_stats.log",
    benchmark:
        "benchmarks/aggregate_stats/aggregate_stats.tsv"
    localrule: True
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    params:
        jobs=get_stats_job_ids,
        loss_models=FINETUNE_BASES,
        gguf_notes=GGUF_SUMMARY_NOTES,
    script:
        "../scripts/aggregate_stats.py"
