from llmpipe.finetune.compare import compare
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    compare(
        base_hf=snakemake.input.base,
        tuned_hf=snakemake.input.tuned,
        heldout=snakemake.input.heldout,
        base_id=snakemake.wildcards.model,
        tuned_id=f"{snakemake.wildcards.model}-ft",
        settings=snakemake.params.settings,
        out_csv=snakemake.output.table,
        out_md=snakemake.output.markdown,
        out_predictions=snakemake.output.predictions,
        threads=snakemake.threads,
    )
