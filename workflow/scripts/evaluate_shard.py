from llmpipe.evaluation.jobs import model_source, run_shard
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
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
    )
