# The estimate of cache_to_shm's jobs: its resources, and the prediction its script records.
STAGE_ESTIMATE = estimate("cache_to_shm")


rule download:
    output:
        hf=directory("results/models/{model}/hf"),
        manifest="results/models/{model}/manifest.json",
    log:
        "logs/download/{model}.log",
    benchmark:
        "benchmarks/download/{model}.tsv"
    # Base models only: a tuned model's folder (<model>-ft) comes from merge_lora.
    wildcard_constraints:
        model=BASE_MODEL_REGEX,
    # Compute nodes of many clusters have no internet: fetch from the submit host.
    localrule: True
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    resources:
        **job_resources(download_estimate, gpus=None),
    params:
        estimate=download_estimate,
        spec=get_model_spec,
        hub=config["hub"],
    script:
        "../scripts/download.py"


rule cache_to_shm:
    input:
        hf="results/models/{model}/hf",
        manifest="results/models/{model}/manifest.json",
    output:
        record="results/staged/{model}/stage.json",
    log:
        "logs/cache_to_shm/{model}.log",
    benchmark:
        "benchmarks/cache_to_shm/{model}.tsv"
    # One Slurm allocation for staging and its consumer: a per-job RAM disk survives between them.
    group:
        "model_io"
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    resources:
        **job_resources(STAGE_ESTIMATE, gpus=None),
    params:
        estimate=STAGE_ESTIMATE,
        root=config["stage"]["root"],
        verify=config["stage"]["verify"],
        reserve_gb=config["stage"]["reserve_gb"],
    script:
        "../scripts/cache_to_shm.py"
