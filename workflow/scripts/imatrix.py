from llmpipe.imatrix import compute_imatrix
from llmpipe.script import measured_job

with measured_job(snakemake) as usage:
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
