"""The user's config: checks beyond the JSON schema, and the tables the workflow expands.

The schema (workflow/schemas/config.schema.yaml) checks types, names and enums; this module checks
what spans several keys and what needs the file system. Imported by the Snakefile: keep it free of
heavy imports (no torch, no transformers).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from llmpipe.constants import IMATRIX_SUFFIX, tokens_bound
from llmpipe.errors import ConfigError

# llama.cpp's quantization types that need no importance matrix, as `llama-quantize --help`
# names them; each maps to the LLAMA_FTYPE_* constant of the same name (tested against llama_cpp).
QUANT_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ3_XXS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
    "F16", "BF16", "F32",
)  # fmt: skip
# These produce garbage (or llama.cpp refuses them) without an importance matrix: allowed only in
# quantize.imatrix.types, whose variants are quantized with one (llmpipe.imatrix).
IMATRIX_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S")
# IMATRIX_SUFFIX (llmpipe.constants): "Q4_K_M-imat" is Q4_K_M quantized with the model's
# importance matrix, next to the plain "Q4_K_M", so the quality table compares the two.
# Types an importance matrix means nothing for (no quantization, or none llama.cpp weights).
_NO_IMATRIX = ("F16", "BF16", "F32")

# The converter's --outtype values and the variant name the reference GGUF gets.
OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


def validate(config: dict, schema_path: str | Path) -> dict:
    """Fill defaults from the schema into ``config`` (in place), then validate it.

    Like snakemake.utils.validate, but a failure is one line naming the key path, the value and
    what was expected (Snakemake's own message dumps the whole sub-schema).
    """
    from jsonschema import Draft202012Validator

    # libyaml's loader when built in: the schema is parsed on every planner start (~7x faster)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schema = yaml.load(Path(schema_path).read_text(), Loader=loader)  # noqa: S506 (safe loader)
    _fill_defaults(config, schema)
    errors = sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        raise ConfigError(_describe(errors[0]))
    return config


def _describe(err) -> str:
    """One line: the key path, the offending value, and what was expected."""
    where = _key_path(err.absolute_path) or "config"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        prefix = "" if where == "config" else f"{where}."
        return f"{prefix}{extra[0]}: unknown key (expected one of: {', '.join(allowed)})"
    if err.validator == "propertyNames" or (err.validator == "pattern" and where == "models"):
        return (
            f"{where}: {err.instance!r} is not a valid id (letters, digits, '.', '_', '-'; "
            f"no leading '.', at most 64 characters; it becomes a folder name under results/)"
        )
    expected = err.schema.get("description", "").split(".")[0]
    hint = f" (expected: {expected})" if expected and err.validator != "enum" else ""
    return f"{where}: {err.message}{hint}"


def _fill_defaults(node: object, schema: dict) -> None:
    if not isinstance(node, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            _fill_defaults(node[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in node.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra)


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def reference_variant(config: dict) -> str:
    """Name of the GGUF the converter writes, which every quantization starts from (e.g. F16)."""
    return OUTTYPES[config["convert"]["outtype"]]


def quant_types(config: dict) -> list[str]:
    return list(config["quantize"]["types"])


def imatrix_section(config: dict) -> dict:
    """``quantize.imatrix`` (its schema defaults where a config was not filled by validate)."""
    defaults = {"types": [], "text": None, "chunks": 100, "n_ctx": 512}
    return {**defaults, **config["quantize"].get("imatrix", {})}


def imatrix_types(config: dict) -> list[str]:
    """The types that also get a ``<TYPE>-imat`` variant (``quantize.imatrix.types``)."""
    return list(imatrix_section(config)["types"])


def uses_imatrix(config: dict, model: str) -> bool:
    """Whether ``model`` gets the ``-imat`` variants: not with ``models.<id>.imatrix: false``.
    A tuned model (``<id>-ft``) follows its base model's setting."""
    spec = config["models"].get(model)
    if spec is None and model.endswith("-ft"):
        spec = config["models"].get(model.removesuffix("-ft"))
    return bool((spec or {}).get("imatrix", True))


def quant_variants(config: dict, model: str | None = None) -> list[str]:
    """The quantized variants: the plain types, then the ``-imat`` ones (``Q4_K_M-imat``).

    With ``model``: that model's list (no ``-imat`` variants when it opts out); without: every
    variant any model may have (the wildcard constraint).
    """
    plain = quant_types(config)
    if model is not None and not uses_imatrix(config, model):
        return plain
    return plain + [f"{quant}{IMATRIX_SUFFIX}" for quant in imatrix_types(config)]


def split_variant(variant: str) -> tuple[str, bool]:
    """``"Q4_K_M-imat"`` -> ``("Q4_K_M", True)``; ``"Q4_K_M"`` -> ``("Q4_K_M", False)``."""
    if variant.endswith(IMATRIX_SUFFIX):
        return variant.removesuffix(IMATRIX_SUFFIX), True
    return variant, False


def model_ids(config: dict) -> list[str]:
    return list(config["models"])


def check(config: dict, workdir: str | Path = ".") -> None:
    """Cross-key checks after schema validation; a ConfigError names key, value and expectation."""
    if not config["models"]:
        raise ConfigError("models: is empty (expected at least one model entry)")
    ref = reference_variant(config)
    for quant in quant_types(config):
        if quant in IMATRIX_TYPES:
            raise ConfigError(
                f"quantize.types: '{quant}' needs an importance matrix: list it under "
                f"quantize.imatrix.types instead (its variant '{quant}{IMATRIX_SUFFIX}' is then "
                f"quantized with the model's matrix from llama-imatrix)"
            )
        if quant not in QUANT_TYPES:
            raise ConfigError(
                f"quantize.types: unknown type '{quant}' (expected one of {', '.join(QUANT_TYPES)})"
            )
        if quant == ref:
            raise ConfigError(
                f"quantize.types: '{quant}' is already the reference GGUF written by "
                f"convert.outtype={config['convert']['outtype']}; remove it from the list"
            )
    dupes = {q for q in quant_types(config) if quant_types(config).count(q) > 1}
    if dupes:
        raise ConfigError(f"quantize.types: listed twice: {', '.join(sorted(dupes))}")
    _check_imatrix(config, Path(workdir))
    for model_id, spec in config["models"].items():
        _check_model(model_id, spec)
    prompts = Path(workdir, config["prompts"])
    if not prompts.is_file():
        raise ConfigError(f"prompts: file {prompts} does not exist (expected one prompt per line)")
    read_prompts(prompts)  # an empty file is an error now, not after the model chain ran


def _check_imatrix(config: dict, workdir: Path) -> None:
    types = imatrix_types(config)
    for quant in types:
        if quant in _NO_IMATRIX or quant == reference_variant(config):
            what = "the reference GGUF itself" if quant == reference_variant(config) else "no"
            raise ConfigError(
                f"quantize.imatrix.types: '{quant}' is {what} quantization: an importance "
                f"matrix cannot change it (expected a type such as Q4_K_M, Q2_K or IQ2_XS)"
            )
    if not types or not any(uses_imatrix(config, m) for m in config["models"]):
        return
    text = imatrix_section(config)["text"]
    if text is not None and not Path(workdir, text).is_file():
        raise ConfigError(
            f"quantize.imatrix.text: file {Path(workdir, text)} does not exist (expected a UTF-8 "
            f"calibration text; null = the part of evaluate.text after the evaluation chunks)"
        )
    evaluate = config.get("evaluate", {}).get("text")
    if text is None and evaluate is not None and not Path(workdir, evaluate).is_file():
        raise ConfigError(
            f"evaluate.text: file {Path(workdir, evaluate)} does not exist (quantize.imatrix.text "
            f"is null, so the calibration text is the part of it after the evaluation chunks)"
        )


_SOURCE_KEYS = {"package": ("package", "file"), "dir": ("path",), "hub": ("repo_id",)}


def _check_model(model_id: str, spec: dict) -> None:
    if model_id in (".", "..") or model_id.startswith("."):
        raise ConfigError(f"models.{model_id}: a model id may not start with '.'")
    kind = spec["source"]
    for key in _SOURCE_KEYS[kind]:
        if not spec.get(key):
            raise ConfigError(
                f"models.{model_id}.{key}: missing (required when source is '{kind}')"
            )
    if kind == "dir" and not Path(spec["path"]).is_absolute():
        raise ConfigError(
            f"models.{model_id}.path: '{spec['path']}' is relative (expected an absolute path on "
            f"shared storage, e.g. /scratch/ai/llms/<name>)"
        )


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (as the seed's farm script takes them); blank lines are skipped.

    A literal backslash-n inside a line becomes a newline, so multi-line prompts fit on one line.
    """
    path = Path(path)
    prompts = [
        line.replace("\\n", "\n")
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if not prompts:
        raise ConfigError(f"prompts: {path} has no prompts (expected one prompt per line)")
    return prompts


def prompt_tokens_bound(prompts: list[str]) -> int:
    """Tokens of the longest prompt (+1 for BOS), bounded from its UTF-8 size, for resource
    planning without a tokenizer (``llmpipe.constants.tokens_bound``)."""
    return tokens_bound(max(len(p.encode("utf-8")) for p in prompts)) + 1
