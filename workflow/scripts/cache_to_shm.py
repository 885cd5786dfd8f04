from llmpipe import atomic, manifest, provenance
from llmpipe.script import logged
from llmpipe.stage import ensure_staged

with logged(snakemake.log[0], snakemake.rule):
    record = ensure_staged(
        snakemake.input.hf,
        manifest.load(snakemake.input.manifest),
        root=snakemake.params.root,
        name=snakemake.wildcards.model,
        verify=snakemake.params.verify,
        reserve_gb=snakemake.params.reserve_gb,
    )
    record["provenance"] = provenance.collect()
    atomic.write_json(snakemake.output.record, record)
