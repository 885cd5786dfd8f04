"""Secure by default: tokens never written, no remote code, safetensors only, ids stay put."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import PLANTED_TOKEN, make_hub_mirror, make_tiny_hf, make_workdir, snakemake

pytestmark = pytest.mark.workflow


def files_containing(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            with open(path, "rb") as fh:
                if needle in fh.read():
                    hits.append(path)
    return hits


@pytest.mark.fault("an HF token in the environment", "(never written: 0 files contain it)")
def test_planted_token_never_written_by_the_default_run(default_run):
    if os.environ.get("LLMPIPE_TEST_RUN"):
        pytest.skip("a reused run was not made with the planted token")
    assert (default_run / "logs").is_dir() and (default_run / "results").is_dir()
    assert files_containing(default_run, PLANTED_TOKEN.encode()) == []


def test_planted_token_never_written_by_a_hub_download(tmp_path):
    """The hub path is the one that hands the token to huggingface_hub."""
    mirror = make_hub_mirror(tmp_path / "mirror", "org/tiny", make_tiny_hf(tmp_path / "tiny"))
    config = {
        "models": {"tiny": {"source": "hub", "repo_id": "org/tiny"}},
        "hub": {"cache_dir": str(mirror), "offline": True},
        "prompts": "config/prompts.txt",
    }
    workdir = make_workdir(tmp_path / "w", config)
    snakemake(
        workdir, "--cores", "1", "results/staged/tiny/stage.json", env={"HF_TOKEN": PLANTED_TOKEN}
    )
    assert (workdir / "results/models/tiny/manifest.json").is_file()
    assert files_containing(workdir, PLANTED_TOKEN.encode()) == []
