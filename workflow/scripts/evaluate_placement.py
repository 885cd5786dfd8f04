from pathlib import Path

from llmpipe.evaluation.placements import run_placement
from llmpipe.hardware import need_for_eval
from llmpipe.script import logged

placement = snakemake.params.placement
gres = getattr(snakemake.resources, "gres", "")
gpu = need_for_eval(snakemake.rule, gres, "llama.cpp", {"n_gpu_layers": [placement.gpus]})
with logged(snakemake.log[0], snakemake.rule, gpu=gpu):
    run_placement(
        model_id=snakemake.wildcards.model,
        variant=snakemake.params.variant,
        gguf=snakemake.input.gguf,
        placement=placement,
        settings=snakemake.params.settings,
        threads=snakemake.threads,
        n_prompt=snakemake.params.n_prompt,
        n_gen=snakemake.params.n_gen,
        repetitions=snakemake.params.repetitions,
        out_json=snakemake.output.result,
        log_dir=str(Path(snakemake.log[0]).parent),
    )
