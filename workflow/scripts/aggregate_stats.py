from llmpipe.report import aggregate
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    counts = aggregate(
        eval_jsons=list(snakemake.input.evals),
        records=list(snakemake.input.records),
        out_csv=snakemake.output.summary,
        out_md=snakemake.output.markdown,
        out_resources=snakemake.output.resources,
        out_plots=snakemake.output.plots,
        out_provenance=snakemake.output.provenance,
        loss_csvs=snakemake.params.losses,
        eval_estimates=snakemake.params.eval_estimates,
        gguf_notes=snakemake.params.gguf_notes,
    )
    print(f"aggregate_stats: {counts}")
