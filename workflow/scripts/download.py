from llmpipe.fetch import fetch_model
from llmpipe.resources import Usage, download_options
from llmpipe.script import logged

spec = snakemake.params.spec
config_json = f"{snakemake.output.hf}/config.json"  # sized from what was downloaded
with (
    logged(snakemake.log[0], snakemake.rule),
    Usage.of_job(snakemake, config_json, **download_options(spec)) as usage,
):
    fetch_model(
        snakemake.wildcards.model,
        spec,
        hf_dir=snakemake.output.hf,
        manifest_path=snakemake.output.manifest,
        hub=snakemake.params.hub,
        extra=usage.fields,
    )
