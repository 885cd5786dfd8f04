"""The user's config: the schema, checks beyond it, and the tables the workflow expands.

The schema (workflow/schemas/config.schema.yaml) is the one source of every key's type, default,
choices and description: ``validate`` fills its defaults and checks the config against it,
``choices`` and ``defaults`` hand its facts to code that needs them, and config/README.md's key
tables are generated from it (``llmpipe.config_docs``). This module adds what spans several keys
and what needs the file system. Imported by the Snakefile: keep it free of heavy imports (no
torch, no transformers).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from llmpipe.constants import IMATRIX_SUFFIX, tokens_bound
from llmpipe.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@functools.lru_cache(maxsize=4)
def _load_schema(path: str) -> dict:
    # libyaml's loader when built in: the schema is parsed on every planner start
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(Path(path).read_text(), Loader=loader)  # noqa: S506 (a safe loader)


def schema(path: str | Path = SCHEMA_PATH) -> dict:
    """The parsed schema, read once per process (shared: do not modify it)."""
    return _load_schema(str(Path(path).resolve()))


def key_schema(key: str) -> dict:
    """The schema of one key, by its dotted path (``evaluate.llama_cpp.kv_type``); ``*`` steps
    into the values of a mapping keyed by the user (``models.*.source``)."""
    node = schema()
    for part in key.split("."):
        if part == "*":
            node = node.get("additionalProperties")
        else:
            node = node.get("properties", {}).get(part)
        if not isinstance(node, dict):
            raise KeyError(f"{key}: not a key of the config schema ({SCHEMA_PATH})")
        node = resolve_ref(node)
    return node


def resolve_ref(node: dict) -> dict:
    """``node`` itself, or the part of the schema its ``$ref`` (``#/properties/...``) points at."""
    while "$ref" in node:
        target = schema()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def choices(key: str) -> tuple:
    """The values the schema allows for ``key`` (its enum, or its items' enum for a list)."""
    node = key_schema(key)
    enum = node.get("enum", node.get("items", {}).get("enum"))
    if enum is None:
        raise KeyError(f"{key}: the config schema lists no choices for it")
    return tuple(enum)


def defaults(key: str) -> dict[str, Any]:
    """The schema's default of every key of section ``key`` that has one (fresh copies)."""
    props = key_schema(key).get("properties", {})
    return {name: copy.deepcopy(sub["default"]) for name, sub in props.items() if "default" in sub}


# llama.cpp's quantization types as `llama-quantize --help` names them (each maps to the
# LLAMA_FTYPE_* constant of the same name, tested against llama_cpp). quantize.types takes those
# that need no importance matrix; the ones quantize.imatrix.types alone allows need one: without
# they produce garbage or llama.cpp refuses them (llmpipe.imatrix computes the matrix).
QUANT_TYPES = choices("quantize.types")
IMATRIX_TYPES = tuple(t for t in choices("quantize.imatrix.types") if t not in QUANT_TYPES)
# IMATRIX_SUFFIX (llmpipe.constants): "Q4_K_M-imat" is Q4_K_M quantized with the model's
# importance matrix, next to the plain "Q4_K_M", so the quality table compares the two.


def validate(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Fill defaults from the schema into ``config`` (in place), then validate it.

    Like snakemake.utils.validate(set_default=True), but a failure is one line naming the key
    path, the value and what was expected (Snakemake's own message dumps the whole sub-schema).
    """
    from jsonschema import Draft202012Validator

    rules = schema(schema_path)
    _fill_defaults(config, rules)
    errors = sorted(Draft202012Validator(rules).iter_errors(config), key=lambda e: list(e.path))
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
    if (
        err.validator == "enum"
        and where.startswith("quantize.types[")
        and (err.instance in IMATRIX_TYPES)
    ):
        return (
            f"quantize.types: '{err.instance}' needs an importance matrix: list it under "
            f"quantize.imatrix.types instead (its variant '{err.instance}{IMATRIX_SUFFIX}' is "
            f"then quantized with the model's matrix from llama-imatrix)"
        )
    if err.validator == "propertyNames" or (err.validator == "pattern" and where == "models"):
        return (
            f"{where}: {err.instance!r} is not a valid id (letters, digits, '.', '_', '-'; "
            f"no leading '.', at most 64 characters; it becomes a folder name under results/)"
        )
    expected = err.schema.get("description", "").split(".")[0]
    hint = f" (expected: {expected})" if expected and err.validator != "enum" else ""
    return f"{where}: {err.message}{hint}"


def _fill_defaults(node: object, rules: dict) -> None:
    """Set every missing key that has a default, walking into sections and user-keyed mappings
    (``models.<id>``); not through ``$ref``s, so per-model fine-tune overrides stay partial."""
    if not isinstance(node, dict):
        return
    for key, sub in rules.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            _fill_defaults(node[key], sub)
    extra = rules.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in node.items():
            if key not in rules.get("properties", {}):
                _fill_defaults(value, extra)


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def reference_variant(config: dict) -> str:
    """Name of the GGUF the converter writes, which every quantization starts from: the
    upper-case ``convert.outtype`` (F16, BF16, F32, Q8_0)."""
    return config["convert"]["outtype"].upper()


def quant_types(config: dict) -> list[str]:
    return list(config["quantize"]["types"])


def imatrix_section(config: dict) -> dict:
    """``quantize.imatrix`` of a validated config."""
    return config["quantize"]["imatrix"]


def imatrix_types(config: dict) -> list[str]:
    """The types that also get a ``<TYPE>-imat`` variant (``quantize.imatrix.types``)."""
    return list(imatrix_section(config)["types"])


def uses_imatrix(config: dict, model: str) -> bool:
    """Whether ``model`` gets the ``-imat`` variants: not with ``models.<id>.imatrix: false``.
    A tuned model (``<id>-ft``) follows its base model's setting."""
    spec = config["models"].get(model)
    if spec is None and model.endswith("-ft"):
        spec = config["models"].get(model.removesuffix("-ft"))
    return spec is None or spec["imatrix"]


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
    """Cross-key checks of a validated config (``validate``: the schema has checked each key's
    type, choices and range); a ConfigError names key, value and expectation."""
    ref = reference_variant(config)
    for quant in quant_types(config):
        if quant == ref:
            raise ConfigError(
                f"quantize.types: '{quant}' is already the reference GGUF written by "
                f"convert.outtype={config['convert']['outtype']}; remove it from the list"
            )
    dupes = {q for q in quant_types(config) if quant_types(config).count(q) > 1}
    if dupes:
        raise ConfigError(f"quantize.types: listed twice: {', '.join(sorted(dupes))}")
    _check_imatrix(config, Path(workdir))
    _check_tasks(config, Path(workdir))
    for model_id, spec in config["models"].items():
        _check_model(model_id, spec)
    prompts = Path(workdir, config["prompts"])
    if not prompts.is_file():
        raise ConfigError(f"prompts: file {prompts} does not exist (expected one prompt per line)")
    read_prompts(prompts)  # an empty file is an error now, not after the model chain ran


def _check_tasks(config: dict, workdir: Path) -> None:
    """evaluate.tasks, when enabled: its folder exists, its variants are the run's."""
    tasks = config["evaluate"]["tasks"]
    if not tasks["enabled"]:
        return
    task_dir = workdir / tasks["task_dir"]
    if not task_dir.is_dir():
        raise ConfigError(
            f"evaluate.tasks.task_dir: folder {task_dir} does not exist (expected the folder of "
            f"the task YAML files, e.g. config/eval/tasks)"
        )
    known = {"hf", reference_variant(config), *quant_variants(config)}
    unknown = [v for v in tasks["variants"] or [] if v not in known]
    if unknown:
        raise ConfigError(
            f"evaluate.tasks.variants: {', '.join(unknown)} not a variant of this run "
            f"(expected some of {', '.join(sorted(known))})"
        )


def _check_imatrix(config: dict, workdir: Path) -> None:
    types = imatrix_types(config)
    ref = reference_variant(config)
    if ref in types:
        raise ConfigError(
            f"quantize.imatrix.types: '{ref}' is the reference GGUF itself (convert.outtype "
            f"{config['convert']['outtype']}): an importance matrix cannot change it (expected a "
            f"type such as Q4_K_M, Q2_K or IQ2_XS)"
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
