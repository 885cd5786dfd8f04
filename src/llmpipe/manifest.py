"""Manifests: the files of a model folder (or a single file) with sizes and sha256.

A manifest is what a consumer checks before trusting a copy: sizes always (cheap), sha256 when
asked. It is stored as JSON next to what it describes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from llmpipe.errors import IntegrityError

CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path) -> list[Path]:
    """Regular files under ``root`` (following symlinks), relative, sorted; hidden files skipped."""
    root = Path(root)
    if root.is_file():
        return [Path(root.name)]
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                files.append(Path(dirpath, name).relative_to(root))
    return files


def build(root: str | os.PathLike, hash_files: bool = True) -> dict:
    """Describe ``root`` (a folder or one file): relative path -> size and sha256."""
    root = Path(root)
    base = root.parent if root.is_file() else root
    entries = {}
    for rel in list_files(root):
        path = base / rel
        entry: dict[str, object] = {"size": path.stat().st_size}
        if hash_files:
            entry["sha256"] = sha256_file(path)
        entries[str(rel)] = entry
    return {"files": entries, "total_bytes": sum(e["size"] for e in entries.values())}


def fingerprint(manifest: dict) -> str:
    """A short id of the content: changes whenever any file's name, size or hash changes."""
    blob = json.dumps(manifest["files"], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def verify(root: str | os.PathLike, manifest: dict, check_hash: bool = False) -> None:
    """Raise IntegrityError naming the first file that is missing, extra-short or altered."""
    root = Path(root)
    base = root.parent if root.is_file() else root
    for rel, entry in manifest["files"].items():
        path = base / rel
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (expected {entry['size']} bytes)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise IntegrityError(
                f"{path}: {size} bytes, expected {entry['size']} (truncated or altered copy)"
            )
        if check_hash and "sha256" in entry and sha256_file(path) != entry["sha256"]:
            raise IntegrityError(f"{path}: sha256 differs from the manifest (corrupt copy)")


def load(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def safetensors_weights(folder: str | os.PathLike) -> dict:
    """Size on disk, parameter count and bits per weight of a model folder's ``*.safetensors``
    files, counted from their headers (the figures a GGUF record has for its file); None where
    the folder has no safetensors weights."""
    size = n_params = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(path, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            counts = [math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__"]
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise IntegrityError(f"{path}: unreadable safetensors header ({err})") from err
        size += path.stat().st_size
        n_params += sum(counts)
    return {
        "size_bytes": size or None,
        "n_params": n_params or None,
        "bits_per_weight": round(8 * size / n_params, 4) if n_params else None,
    }


def write_model_record(
    path: str | os.PathLike,
    *,
    model_id: str,
    origin: dict,
    folder: str | os.PathLike,
    files: dict,
    seconds: float,
    extra: Callable[[dict], dict] | None = None,
) -> dict:
    """A model folder's manifest.json, the one format every producer writes (download,
    merge_lora): id, origin, files, the weights' size and parameter count, fingerprint, time,
    ``extra(record)``'s keys, provenance."""
    from llmpipe import atomic, provenance

    record = {
        "model": model_id,
        "source": origin,
        **files,
        "weights": safetensors_weights(folder),
        "fingerprint": fingerprint(files),
        "seconds": round(seconds, 3),
        "provenance": provenance.collect(),
    }
    if extra is not None:
        record.update(extra(record))
    atomic.write_json(path, record)
    return record
