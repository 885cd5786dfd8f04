# evaluate: speed, hardware figures and quality loss of every model x variant x backend.
# The prompts are farmed out: split into `farm.shards` shards (one job each), gathered by
# `evaluate`. Quality: the backend's reference writes its log-probs once (llama-perplexity's
# base-file format), every other variant is scored against them.
# Environment modules are fixed per rule, so a job that loads a model has one rule per
# backend: the llama.cpp rule, and its `_transformers` twin (`use rule`) that differs only in
# its modules. The Python-only rules (split, probe, gather) load the Python stack.


scattergather:
    farm=config["farm"]["shards"],


rule split_prompts:
    input:
        prompts=config["prompts"],
    output:
        scatter.farm("results/eval/prompts/{scatteritem}.json"),
    log:
        "logs/split_prompts/split_prompts.log",
    localrule: True
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    script:
        "../scripts/split_prompts.py"


rule bandwidth_probe:
    output:
        probe="results/eval/bandwidth/probe.json",
    log:
        "logs/bandwidth_probe/probe.log",
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    threads: EVAL["threads"]
    resources:
        mem_mb=EVAL["bandwidth_probe"]["size_mb"] + 1000,
        runtime=10,
    params:
        size_mb=EVAL["bandwidth_probe"]["size_mb"],
        repetitions=EVAL["bandwidth_probe"]["repetitions"],
    script:
        "../scripts/bandwidth_probe.py"


rule evaluate_shard:
    input:
        unpack(get_eval_model),
        shard="results/eval/prompts/{scatteritem}.json",
        probe=get_eval_probe,
    output:
        result="results/eval/{model}/shards/{variant}-{backend}/{scatteritem}.json",
    log:
        "logs/evaluate_shard/{model}-{variant}-{backend}-{scatteritem}.log",
    benchmark:
        "benchmarks/evaluate_shard/{model}-{variant}-{backend}-{scatteritem}.tsv"
    wildcard_constraints:
        backend=r"llama\.cpp",
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    threads: EVAL["threads"]
    resources:
        **job_resources(eval_estimate("shard")),
    params:
        sampling=EVAL["sampling"],
        settings=get_eval_settings,
        stage=config["stage"],
        bandwidth=get_eval_bandwidth,
        estimate=eval_estimate("shard"),
    script:
        "../scripts/evaluate_shard.py"


use rule evaluate_shard as evaluate_shard_transformers with:
    wildcard_constraints:
        backend="transformers",
    envmodules:
        *get_modules("transformers"),


rule evaluate_reference:
    input:
        unpack(get_eval_model),
        text=EVAL["text"],
    output:
        base=temp("results/eval/{model}/reference-{backend}.kld"),
        result="results/eval/{model}/reference-{backend}.json",
    log:
        "logs/evaluate_reference/{model}-{backend}.log",
    benchmark:
        "benchmarks/evaluate_reference/{model}-{backend}.tsv"
    wildcard_constraints:
        backend=r"llama\.cpp",
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    threads: EVAL["threads"]
    resources:
        **job_resources(eval_estimate("reference")),
    params:
        variant=get_eval_reference,
        n_ctx=EVAL["perplexity"]["n_ctx"],
        chunks=EVAL["perplexity"]["chunks"],
        settings=get_eval_settings,
        stage=config["stage"],
        estimate=eval_estimate("reference"),
    script:
        "../scripts/evaluate_reference.py"


use rule evaluate_reference as evaluate_reference_transformers with:
    wildcard_constraints:
        backend="transformers",
    envmodules:
        *get_modules("transformers"),


rule evaluate_quality:
    input:
        unpack(get_eval_model),
        base="results/eval/{model}/reference-{backend}.kld",
        reference="results/eval/{model}/reference-{backend}.json",
    output:
        result="results/eval/{model}/quality/{variant}-{backend}.json",
    log:
        "logs/evaluate_quality/{model}-{variant}-{backend}.log",
    benchmark:
        "benchmarks/evaluate_quality/{model}-{variant}-{backend}.tsv"
    # llama.cpp only: the transformers backend's one variant is its reference
    wildcard_constraints:
        backend=r"llama\.cpp",
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    threads: EVAL["threads"]
    resources:
        **job_resources(eval_estimate("quality")),
    params:
        settings=get_eval_settings,
        stage=config["stage"],
        estimate=eval_estimate("quality"),
    script:
        "../scripts/evaluate_quality.py"


rule evaluate:
    input:
        shards=gather.farm(
            "results/eval/{{model}}/shards/{{variant}}-{{backend}}/{scatteritem}.json"
        ),
        quality=get_eval_quality,
    output:
        result="results/eval/{model}/{variant}-{backend}.json",
        texts="results/eval/{model}/{variant}-{backend}.texts.jsonl",
    log:
        "logs/evaluate/{model}-{variant}-{backend}.log",
    localrule: True
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    script:
        "../scripts/evaluate.py"


rule evaluate_sweep:
    input:
        unpack(get_sweep_ggufs),
    output:
        tsv="results/eval/{model}/sweep-llama.cpp.tsv",
        md="results/eval/{model}/sweep-llama.cpp.md",
    log:
        "logs/evaluate_sweep/{model}.log",
    benchmark:
        "benchmarks/evaluate_sweep/{model}.tsv"
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    threads: max(EVAL["sweep"]["threads"])
    resources:
        **gpu_resources(int(any(n != 0 for n in EVAL["sweep"]["n_gpu_layers"]))),
        runtime=60,
    params:
        settings=EVAL["llama_cpp"],
        threads=EVAL["sweep"]["threads"],
        n_gpu_layers=EVAL["sweep"]["n_gpu_layers"],
        n_prompt=EVAL["sweep"]["n_prompt"],
        n_gen=EVAL["sweep"]["n_gen"],
        repetitions=EVAL["sweep"]["repetitions"],
    script:
        "../scripts/evaluate_sweep.py"


# One GGUF per model on each placement of evaluate.placements (CPU, GPUs, several hosts by
# llama.cpp's RPC backend): llama-bench's two tests, for the summary's placements table.
rule evaluate_placement:
    input:
        gguf=get_placement_gguf,
    output:
        result="results/eval/{model}/placements/{placement}.json",
    log:
        "logs/evaluate_placement/{model}-{placement}.log",
    benchmark:
        "benchmarks/evaluate_placement/{model}-{placement}.tsv"
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    threads: get_placement_threads
    resources:
        **placement_resources(),
    params:
        placement=get_placement,
        variant=PLAN.placement_variant,
        settings=EVAL["llama_cpp"],
        n_prompt=EVAL["placements"]["n_prompt"],
        n_gen=EVAL["placements"]["n_gen"],
        repetitions=EVAL["placements"]["repetitions"],
    script:
        "../scripts/evaluate_placement.py"


# Task accuracy (evaluate.tasks, off by default): lm-evaluation-harness on one variant per job,
# GGUF variants through llama.cpp's own llama-server (started and stopped by the job).
rule evaluate_tasks:
    input:
        unpack(get_eval_model),
        tasks=PLAN.task_files(),
    output:
        result="results/eval/{model}/tasks/{variant}-{backend}.json",
        lm_eval="results/eval/{model}/tasks/{variant}-{backend}.lm-eval.json",
    log:
        "logs/evaluate_tasks/{model}-{variant}-{backend}.log",
        server="logs/evaluate_tasks/{model}-{variant}-{backend}.server.log",
    benchmark:
        "benchmarks/evaluate_tasks/{model}-{variant}-{backend}.tsv"
    wildcard_constraints:
        backend=r"llama\.cpp",
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    threads: EVAL["threads"]
    resources:
        **job_resources(tasks_estimate),
    params:
        tasks=EVAL["tasks"],
        settings=get_eval_settings,
        estimate=tasks_estimate,
    script:
        "../scripts/evaluate_tasks.py"


use rule evaluate_tasks as evaluate_tasks_transformers with:
    wildcard_constraints:
        backend="transformers",
    envmodules:
        *get_modules("transformers"),
