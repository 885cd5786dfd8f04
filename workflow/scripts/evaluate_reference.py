from llmpipe.evaluation.jobs import model_source, write_reference
from llmpipe.hardware import need_for_eval
from llmpipe.script import measured_job

gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_eval(snakemake.rule, gres, snakemake.wildcards.backend, snakemake.params.settings)
with measured_job(snakemake, gpu=gpu) as usage:
    write_reference(
        backend=snakemake.wildcards.backend,
        model_id=snakemake.wildcards.model,
        variant=snakemake.params.variant,
        **model_source(snakemake.input),
        stage=snakemake.params.stage,
        hf_config=f"{snakemake.input.hf}/config.json",
        text=snakemake.input.text,
        n_ctx=snakemake.params.n_ctx,
        max_chunks=snakemake.params.chunks,
        settings=snakemake.params.settings,
        threads=snakemake.threads,
        out_base=snakemake.output.base,
        out_json=snakemake.output.result,
        usage=usage,
    )
