from llmpipe.fetch import fetch_model
from llmpipe.script import measured_job

spec = snakemake.params.spec
# the record's prediction is sized from what was downloaded
with measured_job(snakemake, config_json=f"{snakemake.output.hf}/config.json") as usage:
    fetch_model(
        snakemake.wildcards.model,
        spec,
        hf_dir=snakemake.output.hf,
        manifest_path=snakemake.output.manifest,
        hub=snakemake.params.hub,
        extra=usage.fields,
    )
