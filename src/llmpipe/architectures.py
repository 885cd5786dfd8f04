"""Which checkpoints the pinned llama.cpp can take, decided from config.json before a run starts.

Three things, all from a model's ``config.json`` and the vendored converter's source:

- ``gguf_support``: can the pinned converter and runtime handle this architecture? The
  converter's registered architectures (``@ModelBase.register(...)`` in ``convert_hf_to_gguf.py``
  and ``conversion/*.py``, read as text, never imported) plus the variants llama.cpp registers
  but cannot run (ALiBi or sequential-attention Falcon, e.g. tiiuae/falcon-rw-1b). The workflow
  plans a model that fails this check as transformers-only, with the reason.
- ``transformers_config``: the older ``RWForCausalLM``/``RefinedWebModel`` form of Falcon
  rewritten as transformers' built-in ``falcon`` (what tiiuae did to their own repos): same
  weights and names, no checkpoint code to run. Applied to our copy at download.
- ``converter_config``: the config as llama.cpp's converter must read it. The converter reads
  config.json through transformers' ``AutoConfig``, which fills ``num_kv_heads`` with
  ``num_attention_heads`` when a multi-query Falcon (falcon-7b) does not state it, and
  ``save_pretrained`` (a merged fine-tune) writes that wrong value out; transformers itself
  ignores it for such a model (one key/value head), the converter does not. ``converter_input``
  gives the converter a folder of links to the checkpoint with the corrected config.json, next to
  the staged copy; the user's folder is never edited.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from llmpipe.paths import LLAMA_CPP_DIR

# model_type of Falcon's older, remote-code form -> its new_decoder_architecture
LEGACY_FALCON = {"RefinedWebModel": False, "RefinedWeb": True}
FALCON_ARCHITECTURES = ("FalconForCausalLM", "RWForCausalLM")
# the older form's key names -> transformers' falcon names
_LEGACY_KEYS = {
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_head_kv": "num_kv_heads",
}
_REGISTER = re.compile(r"@ModelBase\.register\(([^)]*)\)")


@dataclass(frozen=True)
class GgufSupport:
    """Whether a model goes through the GGUF steps; ``reason`` is one line for the summary."""

    supported: bool
    reason: str = ""


@functools.lru_cache(maxsize=4)
def registered_architectures(llama_cpp_dir: str | os.PathLike = LLAMA_CPP_DIR) -> frozenset[str]:
    """The HF architectures the converter in ``llama_cpp_dir`` registers (empty when absent)."""
    root = Path(llama_cpp_dir)
    files = [root / "convert_hf_to_gguf.py", *sorted((root / "conversion").glob("*.py"))]
    names: set[str] = set()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for args in _REGISTER.findall(text):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return frozenset(names)


def architecture(config: Mapping) -> str | None:
    archs = config.get("architectures") or []
    return archs[0] if archs else None


def is_falcon(config: Mapping) -> bool:
    return (
        config.get("model_type") in ("falcon", *LEGACY_FALCON)
        or architecture(config) in FALCON_ARCHITECTURES
    )


def gguf_support(config: Mapping | None, registered: frozenset[str]) -> GgufSupport:
    """Can the pinned llama.cpp convert and run a checkpoint with this config.json?"""
    if config is None:
        return GgufSupport(True, "config.json not readable at planning: assumed convertible")
    arch = architecture(config)
    if arch is None:
        return GgufSupport(False, "config.json names no architecture ('architectures' is empty)")
    if registered and arch not in registered:
        return GgufSupport(
            False,
            f"architecture {arch} is not one of the {len(registered)} that the pinned "
            f"llama.cpp converter registers",
        )
    if is_falcon(config):
        cfg = transformers_config(config) or config
        new_arch = bool(cfg.get("new_decoder_architecture"))
        problems = []
        if cfg.get("alibi"):
            problems.append("ALiBi positions")
        if not new_arch and not cfg.get("parallel_attn", True):
            problems.append("sequential attention")
        if cfg.get("bias"):
            problems.append("linear-layer biases")
        if problems:
            return GgufSupport(
                False,
                f"Falcon with {' and '.join(problems)} (the falcon-rw-1b shape): llama.cpp's "
                f"Falcon has rotary positions, parallel attention and no biases",
            )
    return GgufSupport(True)


def transformers_config(config: Mapping) -> dict | None:
    """The older RefinedWeb form of Falcon as transformers' built-in ``falcon``; None if not it."""
    legacy = config.get("model_type")
    if legacy not in LEGACY_FALCON:
        return None
    out = {k: v for k, v in config.items() if k != "auto_map"}
    for old, new in _LEGACY_KEYS.items():
        if old in out:
            out.setdefault(new, out.pop(old))
    out["model_type"] = "falcon"
    out["architectures"] = ["FalconForCausalLM"]
    out.setdefault("new_decoder_architecture", LEGACY_FALCON[legacy])
    return out


def converter_config(config: Mapping) -> dict | None:
    """config.json as llama.cpp's converter must see it; None when it can read it as is."""
    fixed = transformers_config(config)
    cfg = dict(fixed or config)
    multi_query = cfg.get("multi_query") and not cfg.get("new_decoder_architecture")
    if is_falcon(cfg) and multi_query and cfg.get("num_kv_heads") != 1:
        cfg["num_kv_heads"] = 1  # what transformers' FalconAttention uses for multi-query
        fixed = cfg
    return fixed


def changed_keys(before: Mapping, after: Mapping) -> dict[str, list]:
    """{key: [before, after]} of what a rewrite changed (for the job's record)."""
    keys = sorted(set(before) | set(after))
    return {k: [before.get(k), after.get(k)] for k in keys if before.get(k) != after.get(k)}


def read_config(folder: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def converter_input(hf_dir: str | os.PathLike) -> Iterator[tuple[Path, dict[str, list]]]:
    """The folder to give llama.cpp's converter for ``hf_dir``, and the config keys changed.

    Where the config needs no correction this is ``hf_dir`` itself. Otherwise a folder of
    symlinks to ``hf_dir``'s files beside it (on the RAM disk when ``hf_dir`` is the staged
    copy), with the corrected config.json; removed on exit.
    """
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    fixed = converter_config(config) if config is not None else None
    if fixed is None:
        yield hf_dir, {}
        return
    link_dir = Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}.converter-", dir=hf_dir.parent))
    try:
        for item in hf_dir.iterdir():
            if item.name != "config.json":
                (link_dir / item.name).symlink_to(item.resolve())
        (link_dir / "config.json").write_text(json.dumps(fixed, indent=2) + "\n")
        yield link_dir, changed_keys(config, fixed)
    finally:
        shutil.rmtree(link_dir, ignore_errors=True)


def plan(
    models: Mapping[str, Mapping],
    tuned: Mapping[str, str],
    root: str | os.PathLike = ".",
    llama_cpp_dir: str | os.PathLike = LLAMA_CPP_DIR,
    hub_cache_dir: str | None = None,
) -> dict[str, GgufSupport]:
    """GGUF support of every model id (``models``: config ``models``; ``tuned``: id -> base).

    The config.json read is the user's own for a ``dir`` model; for a ``hub`` model the
    downloaded one, else the hub cache's copy (no network); a ``package`` model is a GGUF
    already. A tuned model inherits its base's answer.
    ``models.<id>.force_gguf: true`` schedules the GGUF steps whatever the check says.
    """
    registered = registered_architectures(llama_cpp_dir)
    out: dict[str, GgufSupport] = {}
    for model_id, spec in models.items():
        if spec["source"] == "package":
            support = GgufSupport(True)
        elif spec["source"] == "dir":
            support = gguf_support(read_config(spec["path"]), registered)
        else:
            config = read_config(Path(root, "results", "models", model_id, "hf"))
            if config is None:
                config = _hub_cached_config(spec, hub_cache_dir)
            support = (
                gguf_support(config, registered)
                if config is not None
                else GgufSupport(True, "not downloaded yet: checked when its config.json is here")
            )
        if not support.supported and spec.get("force_gguf"):
            support = GgufSupport(True, f"forced by models.{model_id}.force_gguf: {support.reason}")
        out[model_id] = support
    for model_id, base in tuned.items():
        out[model_id] = out[base]
    return out


def _hub_cached_config(spec: Mapping, cache_dir: str | None) -> dict | None:
    """A hub model's config.json from the local hub cache, if it is there (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(
        spec["repo_id"], "config.json", cache_dir=cache_dir, revision=spec.get("revision")
    )
    return read_config(Path(path).parent) if isinstance(path, str) else None
