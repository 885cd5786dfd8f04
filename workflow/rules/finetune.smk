# finetune: LoRA / QLoRA of every model in finetune.enabled_for, on one to many GPUs and nodes.
# The tuned model <model>-ft is a model of its own: merge_lora writes its HF folder and
# manifest, and cache_to_shm -> convert_to_gguf -> quantize -> evaluate take it from there.
# Side results: the adapter (PEFT, and as GGUF), loss curve, metrics, base-vs-tuned table.
# The estimate of merge_lora's jobs: its resources, and the prediction its script records.
MERGE_ESTIMATE = estimate("merge_lora", dtype=get_merge_dtype)


rule finetune_data:
    input:
        unpack(get_finetune_data_files),
    output:
        train="results/finetune/{model}/data/train.jsonl",
        heldout="results/finetune/{model}/data/heldout.jsonl",
    log:
        "logs/finetune_data/{model}.log",
    wildcard_constraints:
        model=FINETUNE_BASE_REGEX,
    localrule: True
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    params:
        data=get_finetune_params("data"),
    script:
        "../scripts/finetune_data.py"


rule finetune:
    input:
        hf="results/models/{model}/hf",
        manifest="results/models/{model}/manifest.json",
        train="results/finetune/{model}/data/train.jsonl",
        heldout="results/finetune/{model}/data/heldout.jsonl",
    output:
        adapter=directory("results/finetune/{model}/adapter"),
        loss="results/finetune/{model}/loss.csv",
        plot=report(
            "results/finetune/{model}/loss.png",
            caption="../report/finetune_loss.rst",
            category="Fine-tuning",
            labels={"model": "{model}", "figure": "loss curve"},
        ),
        metrics="results/finetune/{model}/metrics.json",
    log:
        "logs/finetune/{model}.log",
    benchmark:
        "benchmarks/finetune/{model}.tsv"
    wildcard_constraints:
        model=FINETUNE_BASE_REGEX,
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    threads: 8
    resources:
        **job_resources(
            finetune_estimate,
            gpus=get_finetune_gpus,
            processes=get_finetune_gpus_per_node,
        ),
        nodes=get_finetune_nodes,
        # One torchrun per node; with several nodes the script calls srun itself.
        tasks=get_finetune_nodes,
    params:
        estimate=finetune_estimate,
        settings=get_finetune_params("train"),
        # Several nodes: the base model goes to every node's RAM disk by sbcast.
        stage=config["stage"],
        # Not an output: it must survive a killed job, so that the rerun resumes from it.
        checkpoints="results/finetune/{model}/checkpoints",
    script:
        "../scripts/finetune.py"


rule merge_lora:
    input:
        hf="results/models/{model}/hf",
        manifest="results/models/{model}/manifest.json",
        adapter="results/finetune/{model}/adapter",
    output:
        hf=directory("results/models/{model}-ft/hf"),
        manifest="results/models/{model}-ft/manifest.json",
    log:
        "logs/merge_lora/{model}.log",
    benchmark:
        "benchmarks/merge_lora/{model}.tsv"
    wildcard_constraints:
        model=FINETUNE_BASE_REGEX,
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    threads: 2
    resources:
        **job_resources(MERGE_ESTIMATE, gpus=None),
    params:
        estimate=MERGE_ESTIMATE,
        merge=get_finetune_params("merge"),
    script:
        "../scripts/merge_lora.py"


rule lora_to_gguf:
    input:
        hf="results/models/{model}/hf",
        adapter="results/finetune/{model}/adapter",
    output:
        gguf="results/finetune/{model}/adapter-F16.gguf",
        record="results/finetune/{model}/adapter-F16.json",
    log:
        "logs/lora_to_gguf/{model}.log",
    benchmark:
        "benchmarks/lora_to_gguf/{model}.tsv"
    wildcard_constraints:
        model=FINETUNE_BASE_REGEX,
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/lora_to_gguf.py"


rule compare_finetune:
    input:
        base="results/models/{model}/hf",
        tuned="results/models/{model}-ft/hf",
        heldout="results/finetune/{model}/data/heldout.jsonl",
    output:
        table=report(
            "results/finetune/{model}/comparison.csv",
            caption="../report/finetune_comparison.rst",
            category="Fine-tuning",
            labels={"model": "{model}", "figure": "base vs tuned"},
        ),
        markdown="results/finetune/{model}/comparison.md",
        predictions="results/finetune/{model}/predictions.jsonl",
        record="results/finetune/{model}/comparison.json",
    log:
        "logs/compare_finetune/{model}.log",
    benchmark:
        "benchmarks/compare_finetune/{model}.tsv"
    wildcard_constraints:
        model=FINETUNE_BASE_REGEX,
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    threads: 2
    resources:
        **job_resources(compare_estimate, gpus=get_compare_gpus),
    params:
        settings=get_finetune_params("compare"),
        estimate=compare_estimate,
    script:
        "../scripts/compare_finetune.py"
