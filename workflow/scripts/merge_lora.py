from llmpipe.finetune.merge import merge_adapter
from llmpipe.script import measured_job

dtype = snakemake.params.merge["merged_dtype"]
with measured_job(snakemake) as usage:
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
