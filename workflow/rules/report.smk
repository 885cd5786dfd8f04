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


def _stats_files(job):
    """(record, benchmark) of a job, from its rule's declared output and benchmark."""
    proxy = getattr(rules, job.rule)
    record = getattr(proxy.output, STATS_RECORD_OUTPUT[job.rule])
    return record.format(**job.wildcards), proxy.benchmark.format(**job.wildcards)


def get_stats_eval_jsons(wildcards):
    """Every evaluation's JSON: the summary has one row per expected combination."""
    return [
        rules.evaluate.output.result.format(model=m, variant=v, backend=b)
        for m, v, b in PLAN.eval_jsons()
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


def get_stats_loss_csvs(wildcards):
    """The fine-tune loss curve of each fine-tuned base model (params.loss_models)."""
    return [
        rules.finetune.output.loss.format(model=base) for base in PLAN.finetune_bases
    ]


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
        loss_models=PLAN.finetune_bases,
        gguf_notes=PLAN.gguf_summary_notes(),
    script:
        "../scripts/aggregate_stats.py"
