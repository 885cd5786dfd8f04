from llmpipe.evaluation.jobs import probe_bandwidth
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    probe_bandwidth(
        snakemake.output.probe,
        threads=snakemake.threads,
        size_mb=snakemake.params.size_mb,
        repetitions=snakemake.params.repetitions,
    )
