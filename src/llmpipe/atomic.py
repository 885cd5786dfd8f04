"""Atomic outputs: write under a temporary name in the destination folder, then rename.

A job killed at any point leaves either the old state or the finished file, never a partial file
under the final name (rename within one file system is atomic). Leftover temporaries carry the
``.tmp-`` prefix so they are easy to recognise and are never a declared output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmpipe.errors import ResourceError

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``dest``; rename it to ``dest`` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dest.name}.", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, dest)
    except BaseException as err:
        tmp_path.unlink(missing_ok=True)
        _raise_if_disk_full(err, dest)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; it replaces ``dest`` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder normal permissions
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(err, dest)
        raise


def _raise_if_disk_full(err: BaseException, dest: Path) -> None:
    """Turn "no space left" (from Python or a tool's message) into one clear error."""
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or "No space left on device" in str(err)
    if full:
        free = shutil.disk_usage(dest.parent).free / 1e9
        raise ResourceError(
            f"{dest}: the disk is full ({free:.2f} GB free on {dest.parent}); nothing was "
            f"written under this name. Free space or point results/ elsewhere, then rerun"
        ) from err


def remove_leftovers(dest: Path) -> None:
    """Delete temporaries of ``dest`` left by a killed writer (SIGKILL skips every cleanup).

    Safe because one output has one writer at a time: Snakemake never runs two jobs for it.
    """
    # mkstemp/mkdtemp add "." + 8 random characters to the prefix
    pattern = re.compile(re.escape(f"{TMP_PREFIX}{dest.name}.") + r"[A-Za-z0-9_]{8}")
    for old in dest.parent.iterdir():
        if not pattern.fullmatch(old.name):
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def write_text(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: str | os.PathLike, data: Any) -> None:
    write_text(dest, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created, with its folder) for the block: serialises
    jobs of one node that would make the same thing at once (a staged copy, a probe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
