from llmpipe.finetune.merge import merge_adapter
from llmpipe.resources import Usage
from llmpipe.script import logged

dtype = snakemake.params.merge["merged_dtype"]
with logged(snakemake.log[0], snakemake.rule), Usage.of_job(snakemake, dtype=dtype) as usage:
    merge_adapter(
        snakemake.input.hf,
        snakemake.input.adapter,
        snakemake.output.hf,
        snakemake.output.manifest,
        model_id=f"{snakemake.wildcards.model}-ft",
        base_id=snakemake.wildcards.model,
        dtype=dtype,
        base_manifest=snakemake.input.manifest,
        extra=usage.fields,
    )
