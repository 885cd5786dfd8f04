rule download:
    output:
        hf=directory("results/models/{model}/hf"),
        manifest="results/models/{model}/manifest.json",
    log:
        "logs/download/{model}.log",
    benchmark:
        "benchmarks/download/{model}.tsv"
    # Compute nodes of many clusters have no internet: fetch from the submit host.
    localrule: True
    conda:
        "../envs/llmpipe.yaml"
    resources:
        mem_mb=4000,
        runtime=120,
    params:
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
    conda:
        "../envs/llmpipe.yaml"
    resources:
        mem_mb=get_stage_mem_mb,
        runtime=30,
    params:
        root=config["stage"]["root"],
        verify=config["stage"]["verify"],
        reserve_gb=config["stage"]["reserve_gb"],
    script:
        "../scripts/cache_to_shm.py"
