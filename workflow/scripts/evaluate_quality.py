from llmpipe.evaluation.jobs import model_source, run_quality
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    run_quality(
        backend=snakemake.wildcards.backend,
        model_id=snakemake.wildcards.model,
        variant=snakemake.wildcards.variant,
        **model_source(snakemake.input),
        stage=snakemake.params.stage,
        base=snakemake.input.base,
        reference=snakemake.input.reference,
        settings=snakemake.params.settings,
        threads=snakemake.threads,
        out=snakemake.output.result,
    )
