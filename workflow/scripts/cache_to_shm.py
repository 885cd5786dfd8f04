from llmpipe import atomic, manifest, provenance
from llmpipe.script import measured_job
from llmpipe.stage import ensure_staged

with measured_job(snakemake) as usage:
    record = ensure_staged(
        snakemake.input.hf,
        manifest.load(snakemake.input.manifest),
        root=snakemake.params.root,
        name=snakemake.wildcards.model,
        verify=snakemake.params.verify,
        reserve_gb=snakemake.params.reserve_gb,
    )
    record["provenance"] = provenance.collect()
    record.update(usage.fields(record))  # predicted vs measured (RAM-disk bytes included)
    atomic.write_json(snakemake.output.record, record)
