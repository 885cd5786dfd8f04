from llmpipe.evaluation.jobs import model_source, run_shard
from llmpipe.hardware import need_for_eval
from llmpipe.script import measured_job

gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_eval(snakemake.rule, gres, snakemake.wildcards.backend, snakemake.params.settings)
with measured_job(snakemake, gpu=gpu) as usage:
    run_shard(
        backend=snakemake.wildcards.backend,
        model_id=snakemake.wildcards.model,
        variant=snakemake.wildcards.variant,
        **model_source(snakemake.input),
        stage=snakemake.params.stage,
        hf_config=f"{snakemake.input.hf}/config.json",
        shard=snakemake.input.shard,
        sampling=snakemake.params.sampling,
        settings=snakemake.params.settings,
        threads=snakemake.threads,
        bw=snakemake.params.bandwidth,
        out=snakemake.output.result,
        usage=usage,
    )
