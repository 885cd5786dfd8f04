# aggregate_stats: every eval JSON, GGUF record and job resource record of the run in one table
# (results/stats/summary.csv), one page (summary.md: the seed's "??" figures filled in, the
# quality table), the resources predicted vs measured (resources.csv) and plots. Bookkeeping on
# the head node: `snakemake --report report.html` then shows them.
# It reads records only: every file is a named input (common.smk, "aggregate_stats").


rule aggregate_stats:
    input:
        evals=get_stats_eval_jsons,
        weights=get_stats_weights,
        records=get_stats_records,
        benchmarks=get_stats_benchmarks,
        losses=get_stats_loss_csvs,
        placements=get_stats_placements,
        tasks=get_stats_task_jsons,
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
        placement_notes=PLAN.placement_notes(),
        tuned_bases=PLAN.tuned_bases,
    script:
        "../scripts/aggregate_stats.py"
