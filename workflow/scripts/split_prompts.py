from llmpipe.evaluation.jobs import split_prompts
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    split_prompts(snakemake.input.prompts, list(snakemake.output))
