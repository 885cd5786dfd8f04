from pathlib import Path

from llmpipe.gguf import quantize_gguf
from llmpipe.resources import Usage
from llmpipe.script import logged

reference = Path(snakemake.input.gguf).stem.removeprefix(f"{snakemake.wildcards.model}-")
with (
    logged(snakemake.log[0], snakemake.rule),
    Usage.of_job(
        snakemake, quant=snakemake.params.quant, source=reference, threads=snakemake.threads
    ) as usage,
):
    quantize_gguf(
        snakemake.input.gguf,
        snakemake.output.gguf,
        quant=snakemake.params.quant,
        threads=snakemake.threads,
        record_path=snakemake.output.record,
        extra=usage.fields,
        imatrix=snakemake.input.get("imatrix"),  # a <quant>-imat variant's matrix
    )
