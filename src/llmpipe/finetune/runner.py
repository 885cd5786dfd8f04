"""What the workflow's ``finetune`` rule runs: check, launch the training processes, draw the curve.

The training itself runs in child processes (``llmpipe.finetune.train``: transformers' Trainer
with PEFT), started by the command ``llmpipe.finetune.launch`` builds for the configured nodes
and GPUs (one process, torchrun, or srun + torchrun); their output goes to the rule's log. The
spec they read (paths, settings, fingerprints) is written beside Trainer's checkpoints, so a
rerun after an interruption resumes from the newest matching checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llmpipe import atomic, manifest
from llmpipe.errors import ConfigError, PipelineError
from llmpipe.finetune import launch
from llmpipe.finetune.settings import from_dict


def fail_fast(settings: dict[str, Any]) -> str:
    """Refuse, before any process starts, what this machine cannot run; returns the device."""
    from llmpipe.finetune import train

    s = from_dict(settings)
    device = train.choose_device(s.device, s.method)
    if s.method == "qlora":
        train.check_bitsandbytes()
    if s.strategy == "fsdp" and s.total_processes > 1 and device == "cpu":
        # measured: Trainer (accelerate 1.x, transformers 5.24) given fsdp on gloo runs plain
        # DDP and says so only in trainer.is_fsdp_enabled; refuse rather than mislabel the run
        raise ConfigError(
            "finetune.strategy: 'fsdp' needs CUDA devices (transformers' Trainer does not "
            "shard over gloo on the CPU and would run plain DDP); use strategy: ddp on the CPU"
        )
    return device


def write_spec(path: str | os.PathLike, **spec: Any) -> Path:
    path = Path(path)
    atomic.write_json(path, spec)
    return path


def run_finetune(
    *,
    model_id: str,
    base_hf: str,
    base_manifest: str,
    train: str,
    heldout: str,
    settings: dict[str, Any],
    adapter: str,
    loss_csv: str,
    loss_png: str,
    metrics: str,
    checkpoints: str,
    threads: int,
    extra: Callable[[dict], dict] | None = None,
    stage: Mapping[str, Any] | None = None,
    base_id: str | None = None,
) -> None:
    """Fine-tune ``base_hf`` with ``settings`` (``Settings.group("train")``) and write the
    adapter, loss curve (CSV + PNG) and metrics; resumes from ``checkpoints`` when it can.

    ``extra(metrics)`` returns fields merged into the metrics JSON (the job's predicted and
    measured resources: ``llmpipe.resources.Usage.fields``).

    Several nodes (inside their Slurm allocation): the base model is staged once and sent to
    every node's RAM disk (config ``stage``: ``llmpipe.broadcast``, sbcast), and every node's
    processes read their own verified copy instead of all reading shared storage at once."""
    s = from_dict(settings)
    fail_fast(settings)
    base = manifest.load(base_manifest)
    staging = None
    allocation = launch.slurm_allocation()
    if s.nodes > 1 and stage is not None and allocation is not None:
        from llmpipe import broadcast

        staging = broadcast.broadcast(
            base_hf,
            base_id or Path(base_hf).parent.name,
            stage["root"],
            verify=stage.get("verify", "size"),
            reserve_gb=stage.get("reserve_gb", 1.0),
            manifest=base,
        )
        print(f"base model on every node: {staging['path']} ({staging['nodes']})", flush=True)
        base_hf = staging["path"]
    spec = write_spec(
        Path(checkpoints) / "spec.json",
        model_id=model_id,
        base_hf=str(Path(base_hf).resolve()),
        base_fingerprint=base.get("fingerprint") or manifest.fingerprint(base),
        train=str(Path(train).resolve()),
        heldout=str(Path(heldout).resolve()),
        train_sha256=manifest.sha256_file(train),
        heldout_sha256=manifest.sha256_file(heldout),
        settings=settings,
        adapter=str(Path(adapter).resolve()),
        loss_csv=str(Path(loss_csv).resolve()),
        metrics=str(Path(metrics).resolve()),
        checkpoints=str(Path(checkpoints).resolve()),
        threads=threads,
    )
    cmd = launch.launch_command(
        ["--spec", str(spec.resolve())],
        nodes=s.nodes,
        gpus_per_node=s.gpus_per_node,
        allocation=allocation,
        rdzv_port=s.rdzv_port,
    )
    print("running:", shlex.join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(
        cmd,
        env=launch.launch_env(threads, s.gpus_per_node),
        stdout=sys.stderr,
        stderr=sys.stderr,
        check=False,
    )
    if done.returncode != 0:
        raise PipelineError(
            f"training of {model_id} failed (exit {done.returncode}); its messages are above "
            f"in this log. Rerunning resumes from the newest checkpoint in {checkpoints}"
        )
    for path in (adapter, loss_csv, metrics):
        if not Path(path).exists():
            raise PipelineError(f"training of {model_id} ended without writing {path}")
    plot_loss(loss_csv, loss_png, title=f"{model_id}: {s.method} fine-tune loss")
    if extra is not None or staging is not None:
        record = json.loads(Path(metrics).read_text())
        if staging is not None:
            record["staging"] = staging
        if extra is not None:
            record.update(extra(record))
        atomic.write_json(metrics, record)


def plot_loss(loss_csv: str, out_png: str, title: str = "fine-tune loss") -> None:
    """Train loss per step (and its running mean) and held-out loss, against the step."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(loss_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == "train"]
    heldout = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == "heldout"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train (per step)")
        window = max(1, len(losses) // 20)
        smooth = []
        for i in range(len(losses)):
            recent = losses[max(0, i - window + 1) : i + 1]
            smooth.append(sum(recent) / len(recent))
        ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train (mean of {window})")
    if heldout:
        steps, losses = zip(*heldout, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=2, label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per response token (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
