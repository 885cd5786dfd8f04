from llmpipe.finetune.merge import adapter_to_gguf
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    adapter_to_gguf(
        snakemake.input.adapter,
        snakemake.input.hf,
        snakemake.output.gguf,
        snakemake.output.record,
        outtype="f16",
    )
