from llmpipe.evaluation.sweep import run_sweep
from llmpipe.hardware import need_for_eval
from llmpipe.script import logged

gres = getattr(snakemake.resources, "gres", "")
offload = {"n_gpu_layers": list(snakemake.params.n_gpu_layers)}
gpu = need_for_eval(snakemake.rule, gres, "llama.cpp", offload)
with logged(snakemake.log[0], snakemake.rule, gpu=gpu):
    run_sweep(
        model_id=snakemake.wildcards.model,
        ggufs={k: v for k, v in snakemake.input.items()},
        settings=snakemake.params.settings,
        threads=snakemake.params.threads,
        n_gpu_layers=snakemake.params.n_gpu_layers,
        n_prompt=snakemake.params.n_prompt,
        n_gen=snakemake.params.n_gen,
        repetitions=snakemake.params.repetitions,
        out_tsv=snakemake.output.tsv,
        out_md=snakemake.output.md,
    )
