"""Real fine-tune runs, through the rule's entry point (subprocesses): a tiny random-init Llama
with a byte-level BPE tokenizer and SmolLM2's chat template (tests/helpers.py, built in seconds),
and SIGKILL-then-resume on the default run's SmolLM2 (steps slow enough to kill the process
between checkpoints).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_finetune_inputs

from llmpipe.errors import ConfigError
from llmpipe.finetune import dataset as ds
from llmpipe.finetune import launch
from llmpipe.finetune import settings as ft

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_finetune_inputs(tmp_path_factory.mktemp("tiny"))


TINY = {
    "learning_rate": 0.03,
    "max_steps": 12,
    "batch_size": 8,
    "grad_accum": 1,
    "seq_len": 96,
    "gradient_checkpointing": False,
    "lora_dropout": 0.0,
    "lora_r": 8,
    "eval_every": 4,
    "eval_examples": 16,
    "save_every": 4,
    "log_every": 1,
    "warmup_steps": 0,
    "lr_scheduler": "constant",
}


def run_tiny(tiny, out: Path, **overrides) -> dict:
    """One fine-tune of the tiny model through the rule's entry point (subprocesses)."""
    from llmpipe.finetune.runner import run_finetune

    settings = ft.from_dict({**TINY, **overrides}).group(ft.TRAIN)
    run_finetune(
        model_id="tiny-ft",
        base_hf=str(tiny["hf"]),
        base_manifest=str(tiny["manifest"]),
        train=str(tiny["train"]),
        heldout=str(tiny["heldout"]),
        settings=settings,
        adapter=str(out / "adapter"),
        loss_csv=str(out / "loss.csv"),
        loss_png=str(out / "loss.png"),
        metrics=str(out / "metrics.json"),
        checkpoints=str(out / "checkpoints"),
        threads=2,
    )
    return json.loads((out / "metrics.json").read_text())


def read_loss(path: Path, split: str) -> list[tuple[int, float]]:
    import csv

    with open(path) as fh:
        return [
            (int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh) if r["split"] == split
        ]


@pytest.mark.slow
def test_short_training_lowers_the_heldout_loss_and_writes_everything(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    metrics = run_tiny(tiny, tmp_path)
    heldout = read_loss(tmp_path / "loss.csv", "heldout")
    assert [s for s, _ in heldout] == [0, 4, 8, 12]
    assert heldout[-1][1] < 0.8 * heldout[0][1]
    assert len(read_loss(tmp_path / "loss.csv", "train")) == 12
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["processes"] == 1 and metrics["steps"] == 12
    assert metrics["tokens"] > 0 and metrics["tokens_per_s"] > 0 and metrics["peak_rss_mb"] > 0
    assert metrics["flops"]["total"] < metrics["flops"]["full_finetune_equivalent"]
    assert metrics["provenance"]["seed"] == 0
    # Checkpoints were kept for resuming (two newest), never a temporary one.
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["checkpoint-4", "checkpoint-8"]  # Trainer's, each marked complete
    assert all((tmp_path / "checkpoints" / n / "llmpipe.json").is_file() for n in names)
    assert metrics["trainer"] == "transformers.Trainer + peft"
    base = AutoModelForCausalLM.from_pretrained(tiny["hf"])
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert tuned.peft_config["default"].r == TINY["lora_r"]


@pytest.mark.slow
def test_two_process_ddp_on_cpu_matches_one_process(tiny, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): a loadable adapter, and the same weights as one
    process with the same global batch (the loss is the global batch's token mean)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    steps = {"max_steps": 4, "eval_every": 4, "save_every": 100}
    one = run_tiny(tiny, tmp_path / "one", **steps)
    two = run_tiny(tiny, tmp_path / "two", gpus_per_node=2, batch_size=4, **steps)
    assert one["processes"] == 1 and two["processes"] == 2 and two["strategy"] == "ddp"
    assert two["tokens"] == one["tokens"]
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    # float32 sums in another order (gloo's allreduce vs one process): AdamW's m/sqrt(v) can
    # turn that into a step or two (lr 2e-4) on a few near-zero gradients; unsynchronised
    # replicas would differ on most elements
    for key in a:
        off = ~torch.isclose(a[key], b[key], atol=1e-4, rtol=1e-3)
        assert off.float().mean() <= 0.01, (key, int(off.sum()), off.numel())
        assert (a[key] - b[key]).abs().max() <= 4 * 2e-4 * steps["max_steps"], key
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny["hf"]), tmp_path / "two" / "adapter"
    )
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


@pytest.mark.slow
def test_fsdp_on_the_cpu_is_refused_before_any_process_starts(tiny, tmp_path):
    """Trainer given FSDP over gloo runs plain DDP: refused, not run under the wrong label."""
    with pytest.raises(ConfigError, match="'fsdp' needs CUDA devices"):
        run_tiny(tiny, tmp_path, gpus_per_node=2, batch_size=4, strategy="fsdp", max_steps=4)
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_changed_settings_never_resume_an_old_checkpoint(tiny, tmp_path):
    run_tiny(tiny, tmp_path, max_steps=6, save_every=4)
    metrics = run_tiny(tiny, tmp_path, max_steps=6, save_every=4, learning_rate=0.005)
    assert metrics["resumed_from_step"] is None
    metrics = run_tiny(tiny, tmp_path, max_steps=6, save_every=4, learning_rate=0.005)
    assert metrics["resumed_from_step"] == 4


@pytest.mark.slow
def test_merge_and_compare_the_tiny_model(tiny, tmp_path):
    from llmpipe import manifest
    from llmpipe.finetune.compare import compare
    from llmpipe.finetune.merge import adapter_to_gguf, merge_adapter

    run_tiny(tiny, tmp_path, max_steps=4, eval_every=4)
    record = merge_adapter(
        tiny["hf"], tmp_path / "adapter", tmp_path / "ft" / "hf", tmp_path / "ft" / "m.json",
        model_id="tiny-ft", base_id="tiny", base_manifest=tiny["manifest"],
    )  # fmt: skip
    assert record["source"]["kind"] == "finetune" and record["model"] == "tiny-ft"
    manifest.verify(tmp_path / "ft" / "hf", record, check_hash=True)
    assert (tmp_path / "ft" / "hf" / "chat_template.jinja").is_file()
    rows = compare(
        base_hf=str(tiny["hf"]), tuned_hf=str(tmp_path / "ft" / "hf"), heldout=str(tiny["heldout"]),
        base_id="tiny", tuned_id="tiny-ft", settings={"compare_examples": 8},
        out_csv=str(tmp_path / "c.csv"), out_md=str(tmp_path / "c.md"),
        out_predictions=str(tmp_path / "p.jsonl"),
    )  # fmt: skip
    assert [r["role"] for r in rows] == ["base", "tuned"]
    assert rows[1]["perplexity"] < rows[0]["perplexity"]  # trained on this task
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 8
    assert "| tuned | tiny-ft |" in (tmp_path / "c.md").read_text()
    info = adapter_to_gguf(
        tmp_path / "adapter", tiny["hf"], tmp_path / "a.gguf", tmp_path / "a.json"
    )
    assert info["n_tensors"] == 2 * 7 * 2  # A and B of 7 projections in 2 layers


# --------------------------------------------------------------------------------------------
# Interruption: SIGKILL mid-training, then resume from the checkpoint
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_continues_from_the_checkpoint(smollm2_hf, tmp_path):
    """The real model, small steps: killed after its first checkpoint, the rerun resumes there
    and ends with exactly the loss curve and adapter of an uninterrupted run."""
    from safetensors.torch import load_file

    from llmpipe.finetune.runner import write_spec

    data = tmp_path / "data"
    settings = {**ft.Settings().group(ft.DATA), "task_train_examples": 8}
    ds.prepare(settings, data / "train.jsonl", data / "heldout.jsonl")
    train = {
        **ft.Settings().group(ft.TRAIN),
        **TINY,
        "learning_rate": 0.002,
        "batch_size": 2,
        "max_steps": 4,
        "save_every": 2,
        "eval_every": 2,
        "eval_examples": 2,
        "lora_r": 4,
    }

    def spec(name: str) -> Path:
        out = tmp_path / name
        return write_spec(
            out / "spec.json", model_id="smollm2-ft", base_hf=str(smollm2_hf),
            train=str(data / "train.jsonl"), heldout=str(data / "heldout.jsonl"),
            settings=train, adapter=str(out / "adapter"), loss_csv=str(out / "loss.csv"),
            metrics=str(out / "metrics.json"), checkpoints=str(out / "checkpoints"), threads=2,
        )  # fmt: skip

    env = launch.launch_env(2, 1)
    cmd = [sys.executable, "-m", "llmpipe.finetune.train", "--spec"]
    subprocess.run([*cmd, str(spec("whole"))], env=env, check=True, timeout=1200,
                   capture_output=True)  # fmt: skip

    killed = spec("killed")
    proc = subprocess.Popen([*cmd, str(killed)], env=env, stderr=subprocess.PIPE)
    # Complete: Trainer has written it and the marker is there (a half-written one is ignored).
    first = tmp_path / "killed" / "checkpoints" / "checkpoint-2" / "llmpipe.json"
    deadline = time.monotonic() + 1200
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists()

    resumed = subprocess.run(
        [*cmd, str(killed)], env=env, check=True, timeout=1200, capture_output=True, text=True
    )
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2
    for split in ("train", "heldout"):  # one row per step, the same losses
        assert read_loss(tmp_path / "killed" / "loss.csv", split) == read_loss(
            tmp_path / "whole" / "loss.csv", split
        )
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
