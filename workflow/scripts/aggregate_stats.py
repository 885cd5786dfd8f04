from llmpipe.report import aggregate
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    counts = aggregate(
        eval_jsons=list(snakemake.input.evals),
        weights=list(snakemake.input.weights),
        jobs=snakemake.params.jobs,
        records=list(snakemake.input.records),
        benchmarks=list(snakemake.input.benchmarks),
        losses=dict(zip(snakemake.params.loss_models, snakemake.input.losses, strict=True)),
        out_csv=snakemake.output.summary,
        out_md=snakemake.output.markdown,
        out_resources=snakemake.output.resources,
        out_plots=snakemake.output.plots,
        out_provenance=snakemake.output.provenance,
        gguf_notes=snakemake.params.gguf_notes,
        placement_jsons=list(snakemake.input.placements),
        placement_notes=snakemake.params.placement_notes,
        task_jsons=list(snakemake.input.tasks),
        tuned_bases=snakemake.params.tuned_bases,
    )
    print(f"aggregate_stats: {counts}")
