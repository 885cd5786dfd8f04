from llmpipe.finetune.compare import compare
from llmpipe.hardware import need_for_torch
from llmpipe.script import measured_job

gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_torch(snakemake.rule, gres, snakemake.params.settings.get("device") == "cuda")
with measured_job(snakemake, gpu=gpu) as usage:
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
