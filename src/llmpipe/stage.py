"""cache_to_shm: stage a model folder (or one GGUF) on the node-local RAM disk and verify it.

The RAM disk is node-local and, on clusters with Slurm's job_container/tmpfs, private to one job
and wiped at its end. So a staged copy is never trusted blindly: a marker beside it records the
content fingerprint, the host and the Slurm job that made it. A consumer on the same host and in
the same job checks sizes (or sha256 when configured); a copy made by another job is re-hashed in
full before use, and anything missing or wrong is staged again. The workflow only ever declares
the small JSON record as an output, never the RAM-disk path, which the head node cannot see.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from llmpipe import atomic
from llmpipe import manifest as mf
from llmpipe.errors import IntegrityError, ResourceError

MARKER = ".llmpipe-stage.json"
GB = 1e9


def resolve_root(root: str | os.PathLike) -> Path:
    """The configured RAM-disk root with ``$VARS`` expanded and ``%j`` replaced by the Slurm
    job id (``local`` outside Slurm): e.g. ``$SLURM_TMPDIR`` or ``/dev/shm/%j`` on sites whose
    RAM disk is per job."""
    return Path(os.path.expandvars(str(root)).replace("%j", current_job() or "local"))


def stage_dir(root: str | os.PathLike) -> Path:
    """This user's folder on the RAM disk (root itself may be shared by all users of a node)."""
    return resolve_root(root) / f"llmpipe-{getpass.getuser()}"


def current_job() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _usable(dest: Path, manifest: dict, verify: str) -> str | None:
    """Why the copy at ``dest`` cannot be used, or None when it can."""
    marker_path = dest / MARKER
    if not marker_path.is_file():
        return "no staged copy"
    marker = json.loads(marker_path.read_text())
    if marker.get("fingerprint") != mf.fingerprint(manifest):
        return "staged copy holds other content"
    if marker.get("host") != socket.gethostname():
        return f"staged copy was made on {marker.get('host')}"
    same_job = marker.get("job") == current_job()
    try:
        mf.verify(_payload(dest, manifest), manifest, check_hash=verify == "sha256" or not same_job)
    except IntegrityError as err:
        return f"staged copy is damaged: {err}"
    return None


def _payload(dest: Path, manifest: dict) -> Path:
    """The staged folder, or for a single-file manifest the staged file itself."""
    names = list(manifest["files"])
    single = manifest.get("single_file")
    return dest / names[0] if single else dest


def ensure_staged(
    src: str | os.PathLike,
    manifest: dict,
    root: str | os.PathLike,
    name: str,
    verify: str = "size",
    reserve_gb: float = 1.0,
) -> dict:
    """Make sure a verified copy of ``src`` (described by ``manifest``) is on the RAM disk.

    Returns a record: ``path`` to read from, ``hit`` (an existing copy was reused), bytes, seconds
    and GB/s of the copy. Raises ResourceError when the RAM disk lacks room.
    """
    src = Path(src)
    base = stage_dir(root)
    dest = base / f"{name}-{mf.fingerprint(manifest)}"
    start = time.perf_counter()
    with atomic.file_lock(base / f".{dest.name}.lock"):
        reason = _usable(dest, manifest, verify)
        hit = reason is None
        if not hit:
            _remove_old_copies(base, name, keep=dest)
            shutil.rmtree(dest, ignore_errors=True)
            _check_room(base, manifest["total_bytes"], reserve_gb)
            with atomic.atomic_dir(dest) as tmp:
                _copy(src, tmp, manifest)
                mf.verify(_payload(tmp, manifest), manifest, check_hash=verify == "sha256")
                marker = {
                    "fingerprint": mf.fingerprint(manifest),
                    "host": socket.gethostname(),
                    "job": current_job(),
                    "source": str(src),
                }
                (tmp / MARKER).write_text(json.dumps(marker))
    seconds = time.perf_counter() - start
    nbytes = manifest["total_bytes"]
    return {
        "path": str(_payload(dest, manifest)),
        "hit": hit,
        "reason": None if hit else reason,
        "bytes": nbytes,
        "seconds": round(seconds, 4),
        "gb_per_s": None if hit else round(nbytes / GB / max(seconds, 1e-9), 3),
        "verify": verify,
        "host": socket.gethostname(),
        "job": current_job(),
    }


def _check_room(base: Path, nbytes: int, reserve_gb: float) -> None:
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    needed = nbytes + reserve_gb * GB
    if free < needed:
        raise ResourceError(
            f"stage.root: {base} has {free / GB:.2f} GB free, staging needs {nbytes / GB:.2f} GB "
            f"plus stage.reserve_gb={reserve_gb} (free the RAM disk, lower reserve_gb, or ask "
            f"for a node with more memory)"
        )


def _copy(src: Path, dest: Path, manifest: dict) -> None:
    base = src.parent if src.is_file() else src
    for rel in manifest["files"]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / rel, target)  # follows symlinks; uses sendfile/copy_file_range


def _remove_old_copies(base: Path, name: str, keep: Path) -> None:
    """Free the RAM disk of this model's copies with an older fingerprint."""
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}")
    for old in base.iterdir():
        if old != keep and old.is_dir() and pattern.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)


def file_manifest(path: str | os.PathLike, hash_files: bool = False) -> dict:
    """Manifest of one file (e.g. a GGUF that evaluate stages)."""
    built = mf.build(path, hash_files=hash_files)
    built["single_file"] = True
    return built


def read_source(
    src: str | os.PathLike,
    manifest: dict,
    root: str | os.PathLike,
    name: str,
    verify: str = "size",
    reserve_gb: float = 1.0,
) -> tuple[Path, dict]:
    """For a consumer: the path to load from, staging it first; falls back to ``src`` on no room.

    The returned record says where the bytes came from (``load_source``: ``ram_disk`` or
    ``disk``), which evaluate reports next to its load time.
    """
    try:
        record = ensure_staged(src, manifest, root, name, verify, reserve_gb)
        record["load_source"] = "ram_disk"
        return Path(record["path"]), record
    except ResourceError as err:
        record = {"path": str(src), "load_source": "disk", "reason": str(err)}
        print(f"warning: reading from disk, not the RAM disk: {err}", flush=True)
        return Path(src), record
