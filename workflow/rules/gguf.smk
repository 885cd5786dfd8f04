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
        mem_mb=get_mem_mb("convert_to_gguf", outtype=config["convert"]["outtype"]),
        runtime=get_runtime("convert_to_gguf", outtype=config["convert"]["outtype"]),
    params:
        outtype=config["convert"]["outtype"],
        root=config["stage"]["root"],
        verify=config["stage"]["verify"],
        reserve_gb=config["stage"]["reserve_gb"],
    script:
        "../scripts/convert_to_gguf.py"


rule quantize:
    input:
        gguf=get_reference_gguf,
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
        mem_mb=get_mem_mb("quantize", quant=get_quant, source=REFERENCE),
        runtime=get_runtime("quantize", quant=get_quant, source=REFERENCE),
    params:
        quant="{quant}",
    script:
        "../scripts/quantize.py"
