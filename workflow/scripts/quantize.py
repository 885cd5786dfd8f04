from llmpipe.gguf import quantize_gguf
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    quantize_gguf(
        snakemake.input.gguf,
        snakemake.output.gguf,
        quant=snakemake.params.quant,
        threads=snakemake.threads,
        record_path=snakemake.output.record,
    )
