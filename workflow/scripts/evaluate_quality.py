from llmpipe.evaluation.jobs import model_source, run_quality
from llmpipe.resources import Usage
from llmpipe.script import logged

step, options = snakemake.params.estimate  # the plan this job's resources came from
with (
    logged(snakemake.log[0], snakemake.rule),
    Usage.of_job(snakemake, step=step, **options) as usage,
):
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
        usage=usage,
    )
