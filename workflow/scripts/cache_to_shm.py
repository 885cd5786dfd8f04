from llmpipe import atomic, manifest, provenance
from llmpipe.resources import Usage
from llmpipe.script import logged
from llmpipe.stage import ensure_staged

with logged(snakemake.log[0], snakemake.rule), Usage.of_job(snakemake) as usage:
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
