from llmpipe.finetune.compare import compare
from llmpipe.hardware import need_for_torch
from llmpipe.resources import Usage
from llmpipe.script import logged

step, options = snakemake.params.estimate  # the plan this job's resources came from
gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_torch(snakemake.rule, gres, snakemake.params.settings.get("device") == "cuda")
with (
    logged(snakemake.log[0], snakemake.rule, gpu=gpu),
    Usage.of_job(snakemake, step=step, **options) as usage,
):
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
        out_json=snakemake.output.record,
        threads=snakemake.threads,
        extra=usage.fields,
    )
