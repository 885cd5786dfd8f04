"""The suite's layout, its order, and the default workflow run shared by the tests.

Each test lives in the folder of what it needs: tests/unit (no service, no workflow run: plain
library calls, seconds), tests/workflow (marker `workflow`: Snakemake runs, and the steps' real
runs on tiny models: training, conversion) or tests/slurm (marker `slurm`: the local Slurm
cluster, which tests/slurm/conftest.py starts).
Collection fails when a test sits elsewhere or its markers contradict its folder. The session
runs unit, then slurm, then workflow tests, and within a folder the modules with `slow` tests
last, so quick failures show first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import PLANTED_TOKEN, make_workdir, snakemake

TESTS = Path(__file__).resolve().parent
FOLDERS = ("unit", "slurm", "workflow")  # in the order the session runs them
# The fixtures below run the workflow (or read its results): not for unit tests.
RUN_FIXTURES = {"default_run", "smollm2_hf", "smollm2_gguf"}


def _folder(item: pytest.Item) -> str | None:
    try:
        return item.path.relative_to(TESTS).parts[0]
    except ValueError:  # a test file given from outside tests/
        return None


def _layout_problem(item: pytest.Item, folder: str | None) -> str | None:
    """Why this test is in the wrong folder (or carries the wrong marker), or None."""
    markers = {mark.name for mark in item.iter_markers()}
    if folder not in FOLDERS:
        return "is not in tests/unit, tests/workflow or tests/slurm"
    if folder == "unit" and (
        markers & {"workflow", "slurm"} or RUN_FIXTURES & set(item.fixturenames)
    ):
        return "runs the workflow or needs the cluster: it belongs in tests/workflow or tests/slurm"
    if folder == "workflow" and "workflow" not in markers:
        return "is in tests/workflow without the `workflow` marker"
    if folder == "workflow" and "slurm" in markers:
        return "needs the Slurm cluster: it belongs in tests/slurm"
    if folder == "slurm" and "slurm" not in markers:
        return "is in tests/slurm without the `slurm` marker"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    folders = {item: _folder(item) for item in items}
    problems = [
        f"{item.nodeid}: {problem}"
        for item in items
        if folders[item] is not None and (problem := _layout_problem(item, folders[item]))
    ]
    if problems:
        raise pytest.UsageError(
            "tests in the wrong place (see tests/conftest.py):\n" + "\n".join(problems)
        )
    # Whole modules move, never single tests, so module-scoped fixtures are built once.
    first: dict[Path, int] = {}
    slow: set[Path] = set()
    for index, item in enumerate(items):
        first.setdefault(item.path, index)
        if item.get_closest_marker("slow"):
            slow.add(item.path)
    rank = {name: i for i, name in enumerate(FOLDERS)}
    items.sort(
        key=lambda item: (
            rank.get(folders[item], -1),
            item.path in slow,
            first[item.path],
        )
    )


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
