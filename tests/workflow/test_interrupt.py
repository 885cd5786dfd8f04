"""Kill each stage with SIGKILL (node failure, OOM killer, scancel --signal=KILL) mid-write.

After each kill no output of the stage exists under its final name; `snakemake --unlock` and a
rerun finish the job, and every deterministic output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, REPO, make_workdir, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

# (rule, folder where its temporary appears, outputs that must not exist after the kill)
STAGES = [
    ("download", "results/models/smollm2", ["results/models/smollm2/manifest.json"]),
    ("cache_to_shm", "shm/llmpipe-{user}", ["results/staged/smollm2/stage.json"]),
    ("convert_to_gguf", "results/gguf/smollm2", ["results/gguf/smollm2/smollm2-F16.json"]),
    (
        "quantize",
        "results/gguf/smollm2",
        ["results/gguf/smollm2/smollm2-Q8_0.json", "results/gguf/smollm2/smollm2-Q4_K_M.json"],
    ),
]

TARGETS = [f"results/gguf/smollm2/smollm2-{v}.json" for v in ("F16", "Q8_0", "Q4_K_M")]


def kill_when_writing(workdir: Path, folder: Path, timeout: float = 600) -> bool:
    """Start the workflow; SIGKILL it and its jobs as soon as a temporary appears in ``folder``."""
    proc = subprocess.Popen(
        [
            str(BIN / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(workdir),
            "--cores",
            "2",
            *TARGETS,
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if folder.is_dir() and any(p.name.startswith(".tmp-") for p in folder.iterdir()):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def digests(workdir: Path) -> dict[str, str]:
    out = {}
    manifest = json.loads((workdir / "results/models/smollm2/manifest.json").read_text())
    for name, entry in manifest["files"].items():
        out[f"hf/{name}"] = entry["sha256"]
    for variant in ("F16", "Q8_0", "Q4_K_M"):
        record = json.loads((workdir / f"results/gguf/smollm2/smollm2-{variant}.json").read_text())
        out[variant] = record["sha256"]
    return out


def test_sigkill_at_every_stage_then_rerun_is_byte_identical(default_run, tmp_path):
    workdir = make_workdir(tmp_path / "w")
    user = __import__("getpass").getuser()
    for rule, folder, outputs in STAGES:
        caught = kill_when_writing(workdir, workdir / folder.format(user=user))
        assert caught, f"{rule}: never saw its temporary file (did the stage run?)"
        for output in outputs:
            assert not (workdir / output).exists(), f"{rule}: {output} exists after the kill"
        snakemake(workdir, "--unlock")
    snakemake(workdir, "--cores", "2", *TARGETS)
    assert digests(workdir) == digests(default_run)
    leftovers = [p for p in (workdir / "results").rglob(".tmp-*")]
    assert leftovers == []
    # The real files were checked against the manifest: sizes too, not only hashes recorded.
    hf = workdir / "results/models/smollm2/hf"
    manifest = json.loads((workdir / "results/models/smollm2/manifest.json").read_text())
    assert all((hf / n).stat().st_size == e["size"] for n, e in manifest["files"].items())
