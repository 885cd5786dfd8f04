from llmpipe import manifest
from llmpipe.gguf import convert_hf_to_gguf
from llmpipe.script import measured_job
from llmpipe.stage import read_source

with measured_job(snakemake) as usage:
    # Read the model from this node's RAM-disk copy (re-staged here if this job cannot see it).
    hf_dir, staged = read_source(
        snakemake.input.hf,
        manifest.load(snakemake.input.manifest),
        root=snakemake.params.root,
        name=snakemake.wildcards.model,
        verify=snakemake.params.verify,
        reserve_gb=snakemake.params.reserve_gb,
    )
    convert_hf_to_gguf(
        hf_dir,
        snakemake.output.gguf,
        outtype=snakemake.params.outtype,
        record_path=snakemake.output.record,
        source_record=staged,
        extra=usage.fields,
    )
