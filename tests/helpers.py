"""Helpers shared by the tests: run the real Snakemake workflow in a scratch working directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_workdir(workdir: Path, config: dict | None = None) -> Path:
    """A working directory with config/ copied from the repo (optionally a replaced config.yaml).

    The RAM-disk root points into the workdir so tests never touch the real /dev/shm.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "config", workdir / "config", dirs_exist_ok=True)
    if config is None:
        config = default_config()
    write_config(workdir, config)
    return workdir


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def write_config(workdir: Path, config: dict) -> None:
    config = dict(config)
    config.setdefault("stage", {})
    if config["stage"].get("root", "/dev/shm") == "/dev/shm":
        config["stage"] = {**config["stage"], "root": str(workdir / "shm")}
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 3600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the repo's Snakefile in ``workdir`` with the venv's snakemake; output captured."""
    cmd = [
        str(BIN / "snakemake"),
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=workdir, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({done.returncode}):\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    return done


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Dry run: rule -> number of jobs Snakemake would run now (empty when nothing to do)."""
    done = snakemake(workdir, "-n", *args, "--quiet", "rules")  # --quiet takes a list: last
    return parse_job_stats(done.stdout + done.stderr)


def parse_job_stats(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    match = re.search(r"Job stats:\n(.*?)\n\s*total\s+\d+", text, re.S)
    if not match:
        return counts
    for line in match.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def make_tiny_hf(folder: Path, seed: int = 0) -> Path:
    """A real, tiny (random-init) Llama checkpoint with a word-level tokenizer, in seconds."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def copy_run(src: Path, dest: Path) -> Path:
    """A cheap copy of a finished run (results hard-linked, same mtimes) to edit freely.

    Outputs are replaced by rename, never written in place, so the original stays intact.
    """
    shutil.copytree(src / "config", dest / "config")
    shutil.copytree(
        src / ".snakemake",
        dest / ".snakemake",
        symlinks=True,
        ignore=shutil.ignore_patterns("conda", "singularity", "log", "locks"),
    )
    shutil.copytree(src / "results", dest / "results", symlinks=True, copy_function=os.link)
    return dest
