from llmpipe.finetune.runner import run_finetune
from llmpipe.finetune.settings import from_dict
from llmpipe.hardware import need_for_torch
from llmpipe.script import measured_job

settings = snakemake.params.settings
gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_torch(snakemake.rule, gres, from_dict(settings).wants_cuda)
with measured_job(snakemake, gpu=gpu) as usage:
    run_finetune(
        model_id=f"{snakemake.wildcards.model}-ft",
        base_hf=snakemake.input.hf,
        base_manifest=snakemake.input.manifest,
        train=snakemake.input.train,
        heldout=snakemake.input.heldout,
        settings=settings,
        adapter=snakemake.output.adapter,
        loss_csv=snakemake.output.loss,
        loss_png=snakemake.output.plot,
        metrics=snakemake.output.metrics,
        checkpoints=snakemake.params.checkpoints,
        threads=snakemake.threads,
        extra=usage.fields,
        stage=snakemake.params.stage,
        base_id=snakemake.wildcards.model,
    )
