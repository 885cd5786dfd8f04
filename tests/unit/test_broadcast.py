"""A node's side of a broadcast (llmpipe.broadcast.adopt), on plain folders: a good incoming
copy is taken into place, a damaged one is redone from the source, a usable copy is kept."""

from __future__ import annotations

import json
import shutil

import pytest

from llmpipe import broadcast as bc
from llmpipe import manifest as mf
from llmpipe import stage


@pytest.fixture
def model(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"w" * 4096)
    (src / "sub" / "config.json").write_text('{"a": 1}')
    return src


def _incoming(model, root, manifest):
    incoming = bc.incoming_dir(root, "m", manifest)
    shutil.copytree(model, incoming)
    return incoming


@pytest.mark.parametrize("verify", ["size", "sha256"])
def test_a_good_broadcast_copy_is_moved_into_place(model, tmp_path, verify):
    root = tmp_path / "shm"
    manifest = mf.build(model, hash_files=verify == "sha256")
    incoming = _incoming(model, root, manifest)
    out = bc.adopt(model, root, "m", manifest, incoming, verify)
    assert out["outcome"] == "received" and out["usable"]
    dest = bc.copy_dir(root, "m", manifest)
    mf.verify(dest, manifest, check_hash=True)
    marker = json.loads((dest / stage.MARKER).read_text())
    assert marker["via"] == "sbcast" and marker["fingerprint"] == mf.fingerprint(manifest)
    assert not (incoming / "weights.bin").exists()  # moved, not held twice
    # what ensure_staged (the consumer) then finds: a usable copy, not a re-stage
    assert stage.ensure_staged(model, manifest, root, "m", verify)["hit"]
    # and a second adopt keeps it
    assert bc.adopt(model, root, "m", manifest, incoming, verify)["outcome"] == "kept"


@pytest.mark.parametrize(
    ("damage", "verify", "why"),
    [
        ("truncate", "size", "bytes, expected"),
        ("flip", "sha256", "sha256"),
        ("remove", "size", "missing"),
    ],
)
def test_a_damaged_broadcast_copy_is_redone_from_the_source(model, tmp_path, damage, verify, why):
    root = tmp_path / "shm"
    manifest = mf.build(model, hash_files=verify == "sha256")
    incoming = _incoming(model, root, manifest)
    target = incoming / "weights.bin"
    if damage == "truncate":
        target.write_bytes(b"w" * 10)
    elif damage == "flip":
        target.write_bytes(b"x" + b"w" * 4095)
    else:
        target.unlink()
    out = bc.adopt(model, root, "m", manifest, incoming, verify)
    assert out["outcome"] == "restaged" and why in out["reason"]
    mf.verify(bc.copy_dir(root, "m", manifest), manifest, check_hash=True)
