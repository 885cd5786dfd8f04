"""Trainer's checkpoints of one fine-tune: found by step, resumed only when made by the same
run (its fingerprint: settings, data, base model), the others removed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

MARKER = "llmpipe.json"  # in a checkpoint folder: complete, and made with this fingerprint
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def fingerprint(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (``checkpoint-<step>``)."""
    return int(_CHECKPOINT.fullmatch(path.name).group(1))


def checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Trainer's checkpoint folders in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resumable(folder: str | os.PathLike, fp: str, prune: bool = False) -> Path | None:
    """The newest complete checkpoint made with fingerprint ``fp`` (None: start at step 0).
    With ``prune``, remove the others: incomplete ones (killed while Trainer wrote them) and
    those of other settings, data or base model."""
    newest = None
    for _, path in reversed(checkpoints(folder)):
        marker = path / MARKER
        mine = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp
        if mine and newest is None:
            newest = path
        elif not mine and prune:
            shutil.rmtree(path, ignore_errors=True)
    return newest
