"""The command that starts the training processes, from (nodes, GPUs per node, Slurm or not).

- 1 node x 1 process: ``python -m llmpipe.finetune.train …`` (no launcher at all);
- 1 node x G processes: ``python -m torch.distributed.run --standalone --nproc_per_node G -m
  llmpipe.finetune.train …`` (torchrun picks a free local port; CPU processes use gloo);
- N nodes: inside a Slurm allocation of N nodes, one torchrun per node started by ``srun``, all
  meeting at a c10d rendezvous on the allocation's first node::

      srun --nodes N --ntasks N --ntasks-per-node 1 --overlap --kill-on-bad-exit=1 \\
          python -m torch.distributed.run --nnodes N --nproc_per_node G \\
          --rdzv_backend c10d --rdzv_endpoint <first node>:<port> --rdzv_id <job id> \\
          -m llmpipe.finetune.train …

  This replaces the seed's hand-typed ``torchrun --node-rank=i --master-addr=…`` line per node:
  c10d assigns the ranks. Outside Slurm more than one node is refused (nothing would start the
  other nodes' processes).

Standard library only (the workflow's planner imports it).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmpipe.errors import ConfigError, ResourceError

TRAIN_MODULE = "llmpipe.finetune.train"


@dataclass(frozen=True)
class SlurmAllocation:
    """The Slurm job this process runs in: its id and its nodes (expanded, in order)."""

    job_id: str
    nodes: tuple[str, ...]
    cpus_per_task: int | None = None


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list -> host names: ``gpu[01-03,07],login1`` -> gpu01 … login1.

    Handles one bracket group per name (what Slurm prints for flat node names), keeping
    zero-padding; for anything else ``scontrol show hostnames`` is asked.
    """
    names: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", part)
        if not match:
            if "[" in part or "]" in part:
                return _scontrol_hostnames(hostlist)
            names.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                return _scontrol_hostnames(hostlist)
            width = len(lo)
            for number in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{number:0{width}d}{suffix}")
    return names


def _scontrol_hostnames(hostlist: str) -> list[str]:
    if shutil.which("scontrol") is None:
        raise ResourceError(f"cannot expand the Slurm host list {hostlist!r}: no scontrol")
    out = subprocess.run(
        ["scontrol", "show", "hostnames", hostlist],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.split()


def slurm_allocation(env: Mapping[str, str] | None = None) -> SlurmAllocation | None:
    """The Slurm allocation from the environment (None outside Slurm)."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    hostlist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or socket.gethostname()
    cpus = env.get("SLURM_CPUS_PER_TASK")
    return SlurmAllocation(
        job_id=job,
        nodes=tuple(expand_hostlist(hostlist)),
        cpus_per_task=int(cpus) if cpus and cpus.isdigit() else None,
    )


def launch_command(
    module_args: Sequence[str],
    *,
    nodes: int,
    gpus_per_node: int,
    allocation: SlurmAllocation | None,
    rdzv_port: int = 29400,
    python: str = sys.executable,
    module: str = TRAIN_MODULE,
) -> list[str]:
    """The argv that runs ``python -m module *module_args`` on nodes x gpus_per_node processes."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(
            f"finetune: nodes={nodes}, gpus_per_node={gpus_per_node} (expected both >= 1)"
        )
    program = ["-m", module, *module_args]
    if nodes == 1 and gpus_per_node == 1:
        return [python, *program]
    torchrun = [python, "-m", "torch.distributed.run"]
    if nodes == 1:
        return [*torchrun, "--standalone", "--nnodes", "1", "--nproc_per_node",
                str(gpus_per_node), *program]  # fmt: skip
    if allocation is None:
        raise ConfigError(
            f"finetune.nodes: {nodes} nodes need a Slurm allocation of {nodes} nodes (run with "
            f"the Slurm profile); outside Slurm only nodes: 1 can start"
        )
    if len(allocation.nodes) < nodes:
        raise ResourceError(
            f"finetune.nodes: {nodes}, but Slurm job {allocation.job_id} has "
            f"{len(allocation.nodes)} node(s) ({', '.join(allocation.nodes)}); the job must "
            f"request nodes={nodes}"
        )
    srun = ["srun", "--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1",
            "--overlap", "--kill-on-bad-exit=1"]  # fmt: skip
    if allocation.cpus_per_task:
        # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task.
        srun += ["--cpus-per-task", str(allocation.cpus_per_task)]
    rendezvous = [
        "--nnodes", str(nodes),
        "--nproc_per_node", str(gpus_per_node),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"{allocation.nodes[0]}:{rdzv_port}",
        "--rdzv_id", f"llmpipe-{allocation.job_id}",
        "--max_restarts", "0",
    ]  # fmt: skip
    return [*srun, *torchrun, *rendezvous, *program]


def launch_env(threads: int, gpus_per_node: int, env: Mapping[str, str] | None = None) -> dict:
    """The environment of the launched processes: CPU threads shared among a node's processes
    (torchrun would otherwise set OMP_NUM_THREADS=1), and the package on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    per_process = max(1, threads // max(1, gpus_per_node))
    env["OMP_NUM_THREADS"] = str(per_process)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in paths:
        env["PYTHONPATH"] = os.pathsep.join([src, *paths])
    return env
