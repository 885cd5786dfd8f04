from llmpipe.finetune.merge import merge_adapter
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    merge_adapter(
        snakemake.input.hf,
        snakemake.input.adapter,
        snakemake.output.hf,
        snakemake.output.manifest,
        model_id=f"{snakemake.wildcards.model}-ft",
        base_id=snakemake.wildcards.model,
        dtype=snakemake.params.merge["merged_dtype"],
        base_manifest=snakemake.input.manifest,
    )
