# Shared by all rules: the model table, wildcard constraints, input functions, resources.
# Parsed on every run and inside every job: keep it light (no torch, no transformers).
import os
import re
import sys

SRC = os.path.join(workflow.basedir, "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
# Jobs (local or Slurm) run the scripts with their own Python: let them find the package too.
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if SRC not in _paths:
    os.environ.update(PYTHONPATH=os.pathsep.join([SRC, *_paths]))

from llmpipe import config as cfg  # noqa: E402

cfg.validate(config, workflow.source_path("../schemas/config.schema.yaml"))
cfg.check(config)

MODELS = cfg.model_ids(config)
REFERENCE = cfg.reference_variant(config)
QUANTS = cfg.quant_types(config)


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    quant="|".join(map(re.escape, QUANTS)) if QUANTS else "(?!)",


def get_model_spec(wildcards):
    return config["models"][wildcards.model]


def get_reference_gguf(wildcards):
    return f"results/gguf/{wildcards.model}/{wildcards.model}-{REFERENCE}.gguf"


def get_final_outputs():
    """Everything `rule all` asks for, from the config."""
    outputs = []
    for model in MODELS:
        outputs.append(f"results/staged/{model}/stage.json")
        for variant in [REFERENCE, *QUANTS]:
            outputs.append(f"results/gguf/{model}/{model}-{variant}.gguf")
            outputs.append(f"results/gguf/{model}/{model}-{variant}.json")
    return outputs


def get_manifest_bytes(input):
    """Size of the model folder from its manifest (0 before it exists, e.g. in a dry run)."""
    import json

    try:
        with open(input.manifest) as fh:
            return json.load(fh)["total_bytes"]
    except (OSError, AttributeError, KeyError, ValueError):
        return 0


def get_stage_mem_mb(wildcards, input, attempt):
    """RAM-disk bytes count against the job's memory: the copy plus a working margin."""
    return int(get_manifest_bytes(input) / 1e6 * 1.1 + 1000 * attempt)


def get_convert_mem_mb(wildcards, input, attempt):
    """The converter is lazy (tensor by tensor) but holds the largest tensors: ~1x model + 2 GB."""
    return int(get_manifest_bytes(input) / 1e6 + 2000 * attempt)


def get_quantize_mem_mb(wildcards, input, attempt):
    """llama_model_quantize keeps the source mmapped and a few tensors in flight."""
    size = os.path.getsize(input.gguf) if os.path.exists(input.gguf) else 0
    return int(size / 1e6 * 0.5 + 1000 * attempt)
