from llmpipe.evaluation.jobs import model_source, write_reference
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
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
    )
