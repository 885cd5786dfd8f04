from llmpipe.evaluation.jobs import model_source, run_quality
from llmpipe.hardware import need_for_eval
from llmpipe.script import measured_job

gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_eval(snakemake.rule, gres, snakemake.wildcards.backend, snakemake.params.settings)
with measured_job(snakemake, gpu=gpu) as usage:
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
