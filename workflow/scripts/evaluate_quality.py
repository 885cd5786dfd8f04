from llmpipe.evaluation.jobs import model_source, run_quality
from llmpipe.hardware import need_for_eval
from llmpipe.resources import Usage
from llmpipe.script import logged

step, options = snakemake.params.estimate  # the plan this job's resources came from
gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_eval(snakemake.rule, gres, snakemake.wildcards.backend, snakemake.params.settings)
with (
    logged(snakemake.log[0], snakemake.rule, gpu=gpu),
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
