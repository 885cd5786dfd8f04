"""cache_to_shm and atomic outputs: verified copies, re-staging of bad or foreign copies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmpipe import atomic, manifest
from llmpipe.errors import IntegrityError, ResourceError
from llmpipe.stage import MARKER, ensure_staged, file_manifest, read_source


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "weights.bin").write_bytes(os.urandom(3_000_000))
    (folder / "sub" / "tok.json").write_text("{}")
    return folder


def stage(model_dir, root, **kw):
    return ensure_staged(model_dir, manifest.build(model_dir), root, "m", **kw)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic.atomic_path(dest) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    atomic.write_text(dest, "done")
    assert dest.read_text() == "done" and oct(dest.stat().st_mode & 0o777) != "0o600"


def test_atomic_dir_replaces_only_on_success(tmp_path):
    dest = tmp_path / "d"
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(ValueError), atomic.atomic_dir(dest) as tmp:
        (tmp / "f").write_text("2")
        raise ValueError
    assert (dest / "f").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_manifest_detects_truncation_and_corruption(model_dir):
    built = manifest.build(model_dir)
    assert set(built["files"]) == {"config.json", "weights.bin", "sub/tok.json"}
    weights = model_dir / "weights.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1])
    with pytest.raises(IntegrityError, match="weights.bin: 2999999 bytes, expected 3000000"):
        manifest.verify(model_dir, built)
    weights.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    manifest.verify(model_dir, built)  # same size: only the hash can tell
    with pytest.raises(IntegrityError, match="sha256 differs"):
        manifest.verify(model_dir, built, check_hash=True)


def test_stage_copies_verifies_and_reuses(model_dir, tmp_path):
    root = tmp_path / "shm"
    first = stage(model_dir, root)
    assert not first["hit"] and first["gb_per_s"] > 0
    staged = Path(first["path"])
    assert (staged / "weights.bin").read_bytes() == (model_dir / "weights.bin").read_bytes()
    assert (staged / MARKER).is_file()
    second = stage(model_dir, root)
    assert second["hit"] and second["path"] == first["path"]


def test_damaged_copy_is_restaged(model_dir, tmp_path):
    root = tmp_path / "shm"
    staged = Path(stage(model_dir, root)["path"])
    (staged / "weights.bin").write_bytes(b"short")
    again = stage(model_dir, root)
    assert not again["hit"] and "damaged" in again["reason"]
    assert (staged / "weights.bin").stat().st_size == 3_000_000


def test_copy_from_another_job_is_rehashed(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "shm"
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    staged = Path(stage(model_dir, root)["path"])
    data = (staged / "weights.bin").read_bytes()
    (staged / "weights.bin").write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size
    assert stage(model_dir, root)["hit"]  # same job, size check: trusted
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    again = stage(model_dir, root)  # another job: full hash, finds the flipped byte
    assert not again["hit"] and "sha256" in again["reason"]
    assert (staged / "weights.bin").read_bytes() == (model_dir / "weights.bin").read_bytes()


def test_new_content_replaces_old_copy(model_dir, tmp_path):
    root = tmp_path / "shm"
    old = Path(stage(model_dir, root)["path"])
    (model_dir / "config.json").write_text('{"a": 2}')
    new = Path(stage(model_dir, root)["path"])
    assert new != old and new.is_dir() and not old.exists()


def test_no_room_on_the_ram_disk(model_dir, tmp_path):
    with pytest.raises(ResourceError, match=r"stage.root: .* GB free, staging needs"):
        stage(model_dir, tmp_path / "shm", reserve_gb=1e9)
    path, record = read_source(
        model_dir, manifest.build(model_dir), tmp_path / "shm", "m", reserve_gb=1e9
    )
    assert path == model_dir and record["load_source"] == "disk"


def test_single_file_staging(model_dir, tmp_path):
    src = model_dir / "weights.bin"
    path, record = read_source(src, file_manifest(src), tmp_path / "shm", "w")
    assert record["load_source"] == "ram_disk" and path.name == "weights.bin"
    assert path.read_bytes() == src.read_bytes()


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".tmp-out.gguf.abc123_z").write_bytes(b"half a file")
    (tmp_path / ".tmp-hf.xyz45678").mkdir()
    (tmp_path / ".tmp-other.json.q1234567").write_text("another output's temporary")
    (tmp_path / ".tmp-out.gguf.json.12345678").write_text("out.gguf.json's temporary")
    atomic.write_text(tmp_path / "out.gguf", "whole")
    with atomic.atomic_dir(tmp_path / "hf") as tmp:
        (tmp / "f").write_text("x")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".tmp-other.json.q1234567", ".tmp-out.gguf.json.12345678", "hf", "out.gguf"]


def test_root_with_job_placeholder_and_env_vars(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAMDISK", str(tmp_path / "rd"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    local = Path(stage(model_dir, "$RAMDISK/%j")["path"])
    assert local.parent.parent == tmp_path / "rd" / "local"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    in_job = stage(model_dir, "$RAMDISK/%j")
    assert Path(in_job["path"]).parent.parent == tmp_path / "rd" / "4242" and not in_job["hit"]
