# LLM life cycle: download -> cache_to_shm -> convert_to_gguf -> quantize (-> evaluate ...).
# The logic lives in the `llmpipe` package (src/llmpipe); rules and scripts are thin adapters.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# common.smk validates the config against workflow/schemas/config.schema.yaml first.
include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/gguf.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
