from llmpipe.gguf import quantize_gguf
from llmpipe.script import measured_job

with measured_job(snakemake) as usage:
    quantize_gguf(
        snakemake.input.gguf,
        snakemake.output.gguf,
        quant=snakemake.params.quant,
        threads=snakemake.threads,
        record_path=snakemake.output.record,
        extra=usage.fields,
        imatrix=snakemake.input.get("imatrix"),  # a <quant>-imat variant's matrix
    )
