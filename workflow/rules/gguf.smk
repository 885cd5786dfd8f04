# The estimate of each rule's jobs: its resources, and the prediction its script records.
CONVERT_ESTIMATE = estimate("convert_to_gguf", outtype=config["convert"]["outtype"])
IMATRIX_ESTIMATE = estimate("imatrix", **PLAN.imatrix_estimate())
QUANTIZE_ESTIMATE = estimate("quantize", quant=get_quant, source=REFERENCE)


rule convert_to_gguf:
    input:
        hf="results/models/{model}/hf",
        manifest="results/models/{model}/manifest.json",
        staged="results/staged/{model}/stage.json",
    output:
        gguf="results/gguf/{model}/{model}-{reference}.gguf",
        record="results/gguf/{model}/{model}-{reference}.json",
    log:
        "logs/convert_to_gguf/{model}-{reference}.log",
    benchmark:
        "benchmarks/convert_to_gguf/{model}-{reference}.tsv"
    wildcard_constraints:
        reference=REFERENCE,
    group:
        "model_io"
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("transformers"),
    threads: 2
    resources:
        **job_resources(CONVERT_ESTIMATE, gpus=None),
    params:
        estimate=CONVERT_ESTIMATE,
        outtype=config["convert"]["outtype"],
        root=config["stage"]["root"],
        verify=config["stage"]["verify"],
        reserve_gb=config["stage"]["reserve_gb"],
    script:
        "../scripts/convert_to_gguf.py"


rule imatrix:
    input:
        unpack(get_imatrix_input),
    output:
        imatrix="results/gguf/{model}/{model}.imatrix",
        record="results/gguf/{model}/{model}.imatrix.json",
    log:
        "logs/imatrix/{model}.log",
    benchmark:
        "benchmarks/imatrix/{model}.tsv"
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    threads: EVAL["threads"]
    resources:
        **job_resources(IMATRIX_ESTIMATE),
    params:
        n_ctx=IMATRIX["n_ctx"],
        chunks=IMATRIX["chunks"],
        eval_n_ctx=EVAL["perplexity"]["n_ctx"],
        eval_chunks=EVAL["perplexity"]["chunks"],
        n_gpu_layers=EVAL["llama_cpp"]["n_gpu_layers"],
        estimate=IMATRIX_ESTIMATE,
    script:
        "../scripts/imatrix.py"


rule quantize:
    input:
        unpack(get_quantize_input),
    output:
        gguf="results/gguf/{model}/{model}-{quant}.gguf",
        record="results/gguf/{model}/{model}-{quant}.json",
    log:
        "logs/quantize/{model}-{quant}.log",
    benchmark:
        "benchmarks/quantize/{model}-{quant}.tsv"
    conda:
        "../envs/llmpipe.yaml"
    envmodules:
        *get_modules("llama_cpp"),
    threads: 2
    resources:
        **job_resources(QUANTIZE_ESTIMATE, gpus=None),
    params:
        estimate=QUANTIZE_ESTIMATE,
        quant=get_quant_type,
    script:
        "../scripts/quantize.py"
