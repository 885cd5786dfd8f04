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
# Every job of the default run sees this hub token; test_security checks it is never written.
PLANTED_TOKEN = "hf_PlantedSecretToken0123456789abcdefXYZ"

# What aggregate_stats writes (tests/unit/test_report.py, tests/workflow/test_report_workflow.py):
# PNG plots, and the summary columns the issue asks for (present and, for a CPU run, finite; VRAM
# is only measured on a GPU).
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_COLUMNS = (
    "model",
    "variant",
    "backend",
    "size_bytes",
    "bits_per_weight",
    "load_s",
    "prefill_tok_s",
    "decode_tok_s_aggregate",
    "decode_tok_s_per_sequence",
    "tokens_per_min",
    "wall_s",
    "ppl",
    "ppl_ratio",
    "kld_mean",
    "same_top_pct",
    "peak_rss_mb",
    "peak_vram_mb",
    "predicted_mem_mb",
    "gb_disk_to_device",
    "flops",
    "achieved_gb_s",
    "roofline_pct",
)
NUMERIC_COLUMNS = [
    c for c in REQUIRED_COLUMNS if c not in ("model", "variant", "backend", "peak_vram_mb")
]


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
    # benchmarks/ too (outputs that aggregate_stats reads), copied: Snakemake writes a rerun
    # job's benchmark in place, which through a hard link would touch the original's
    shutil.copytree(src / "benchmarks", dest / "benchmarks", copy_function=shutil.copy2)
    return dest


def make_hub_mirror(root: Path, repo_id: str, src: Path, commit: str = "a" * 40) -> Path:
    """A local mirror in the Hugging Face cache layout (models--org--name/snapshots/<rev>)."""
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return root


# SmolLM2's chat template (ChatML), for the tiny chat model below.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_chat_model(folder: Path, seed: int = 0) -> Path:
    """Random-init Llama (2 layers, hidden 64) + byte-level BPE trained on the task's text,
    with a ChatML template like SmolLM2's: a complete HF folder in a few seconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llmpipe.finetune import tasks

    train, heldout = tasks.generate("reverse_words", 400, 50, seed=99)
    corpus = [r["instruction"] + " " + r["response"] for r in train + heldout]
    corpus += ["system user assistant You are a helpful AI assistant"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        # Wide enough embeddings that a normed hidden state can make confident logits: with
        # the default 0.02 the output stays near-uniform whatever the adapters learn.
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def make_finetune_inputs(root: Path) -> dict[str, Path]:
    """A tiny chat model folder with a manifest, and the default fine-tune task's data."""
    from llmpipe import atomic, manifest
    from llmpipe.finetune import dataset as ds
    from llmpipe.finetune import settings as ft

    hf = make_tiny_chat_model(root / "hf")
    files = manifest.build(hf)
    atomic.write_json(root / "manifest.json", {**files, "fingerprint": manifest.fingerprint(files)})
    settings = {**ft.Settings().group(ft.DATA), "task_train_examples": 128}
    ds.prepare(settings, root / "train.jsonl", root / "heldout.jsonl")
    return {"hf": hf, "manifest": root / "manifest.json", "train": root / "train.jsonl",
            "heldout": root / "heldout.jsonl"}  # fmt: skip


def markdown_rows(md: str, *header: str) -> list[list[str]]:
    """The cells of the first pipe table whose header starts with ``header``."""
    lines = md.splitlines() + [""]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    start = next(i for i, row in enumerate(cells) if tuple(row[: len(header)]) == header)
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return cells[start:end]
