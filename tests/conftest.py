"""Session fixtures: the default workflow is run once, for real, and shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_workdir, snakemake
from slurm_cluster import slurm_cluster, slurm_session  # noqa: F401  (local Slurm cluster)


@pytest.fixture(scope="session", autouse=True)
def _slurm_controller_for_the_session(request):
    """Once the Slurm client is installed, every snakemake start asks scontrol (10 s timeout
    without a controller): keep the local cluster up for the whole session where it can run."""
    return request.getfixturevalue("slurm_session")


PLANTED_TOKEN = "hf_PlantedSecretToken0123456789abcdefXYZ"


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """The working directory of one complete `snakemake --cores 2` run on the default config.

    LLMPIPE_TEST_RUN=<workdir> reuses a finished run (developer shortcut; CI never sets it).
    """
    reuse = os.environ.get("LLMPIPE_TEST_RUN")
    if reuse:
        return Path(reuse)
    workdir = make_workdir(tmp_path_factory.mktemp("default-run"))
    # Every job of the run sees a planted hub token; test_security checks it is never written.
    snakemake(workdir, "--cores", "2", env={"HF_TOKEN": PLANTED_TOKEN})
    return workdir


@pytest.fixture(scope="session")
def smollm2_hf(default_run) -> Path:
    """The default model's Hugging Face folder (safetensors + tokenizer)."""
    return default_run / "results" / "models" / "smollm2" / "hf"


@pytest.fixture(scope="session")
def smollm2_gguf(default_run):
    """smollm2_gguf("Q4_K_M") -> path of that GGUF variant of the default model."""

    def path(variant: str) -> Path:
        return default_run / "results" / "gguf" / "smollm2" / f"smollm2-{variant}.gguf"

    return path
