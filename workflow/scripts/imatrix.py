from llmpipe.imatrix import compute_imatrix
from llmpipe.resources import Usage
from llmpipe.script import logged

step, options = snakemake.params.estimate  # the plan this job's resources came from
with (
    logged(snakemake.log[0], snakemake.rule),
    Usage.of_job(snakemake, step=step, **options) as usage,
):
    compute_imatrix(
        reference=snakemake.input.gguf,
        out=snakemake.output.imatrix,
        record_path=snakemake.output.record,
        eval_text=snakemake.input.eval_text,
        eval_n_ctx=snakemake.params.eval_n_ctx,
        eval_chunks=snakemake.params.eval_chunks,
        text=snakemake.input.get("text"),
        n_ctx=snakemake.params.n_ctx,
        chunks=snakemake.params.chunks,
        threads=snakemake.threads,
        n_gpu_layers=snakemake.params.n_gpu_layers,
        model_id=snakemake.wildcards.model,
        extra=usage.fields,
    )
