from llmpipe.fetch import fetch_model
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    fetch_model(
        snakemake.wildcards.model,
        snakemake.params.spec,
        hf_dir=snakemake.output.hf,
        manifest_path=snakemake.output.manifest,
        hub=snakemake.params.hub,
    )
