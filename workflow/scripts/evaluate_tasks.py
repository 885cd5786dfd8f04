from llmpipe.evaluation.tasks import run_tasks
from llmpipe.hardware import need_for_eval
from llmpipe.script import measured_job

gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_eval(snakemake.rule, gres, snakemake.wildcards.backend, snakemake.params.settings)
with measured_job(snakemake, gpu=gpu) as usage:
    run_tasks(
        backend=snakemake.wildcards.backend,
        model_id=snakemake.wildcards.model,
        variant=snakemake.wildcards.variant,
        model_path=snakemake.input.model,
        tasks_cfg=snakemake.params.tasks,
        backend_cfg=snakemake.params.settings,
        threads=snakemake.threads,
        out=snakemake.output.result,
        raw_out=snakemake.output.lm_eval,
        server_log=snakemake.log.server,
        usage=usage,
    )
