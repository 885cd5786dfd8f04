from llmpipe.evaluation.jobs import gather
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    gather(
        model_id=snakemake.wildcards.model,
        variant=snakemake.wildcards.variant,
        backend=snakemake.wildcards.backend,
        shards=list(snakemake.input.shards),
        quality=snakemake.input.quality,
        out_json=snakemake.output.result,
        out_texts=snakemake.output.texts,
    )
