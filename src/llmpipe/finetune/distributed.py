"""The process group, from the environment torchrun sets, and the model's DDP/FSDP wrapping.

Under ``torchrun`` each process has RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT from the
rendezvous); without them training runs as one plain process. GPUs use NCCL, one device per
process (``cuda:LOCAL_RANK``); CPU processes use gloo (the local two-process test).

- ``ddp``: every process holds the whole model; gradients of the trainable (LoRA) parameters
  are averaged after each optimizer step's last micro-batch.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) per decoder layer and at the root:
  parameters, gradients and optimizer state are sharded, so a model that does not fit one GPU
  (13B in fp16 is 26 GB, beyond a V100-32GB once activations are added) trains on several. The
  weights are loaded in fp32 and computed in fp16 (``MixedPrecisionPolicy``; V100: no bf16).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from llmpipe.errors import ResourceError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) without them."""
    env = os.environ if env is None else env
    return (
        int(env.get("RANK", 0)),
        int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)),
    )


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_device(device: str, method: str) -> str:
    """'cuda' or 'cpu' for the settings' ``device`` (auto = CUDA when present); QLoRA and an
    explicit 'cuda' fail fast, before any model is loaded, where there is no CUDA."""
    has_cuda = cuda_available()
    if method == "qlora" and not has_cuda:
        raise ResourceError(
            "finetune.method: qlora needs a CUDA GPU (bitsandbytes 4-bit/8-bit kernels), and "
            "this machine has none (torch.cuda.is_available() is False); use method: lora "
            "here, or run on a GPU node"
        )
    if device == "cuda" and not has_cuda:
        raise ResourceError(
            "finetune.device: cuda, but torch.cuda.is_available() is False on this machine "
            "(no GPU, no driver, or a CPU-only torch build); use device: auto or cpu"
        )
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


def check_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ResourceError(
            "finetune.method: qlora needs the bitsandbytes package (pip install bitsandbytes, "
            "in the workflow's environment on the GPU nodes; see README)"
        ) from err


def init(device: str, timeout_min: int = 30) -> Dist:
    """Join the process group (when launched by torchrun) and pick this process's device."""
    import torch
    import torch.distributed as dist

    rank, world, local = env_ranks()
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise ResourceError(
                f"finetune: process {rank} wants GPU {local}, but this node shows "
                f"{torch.cuda.device_count()} (finetune.gpus_per_node larger than the GPUs "
                f"the job was given?)"
            )
        torch.cuda.set_device(local)
        dev = f"cuda:{local}"
    else:
        dev = "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_min),
            **({"device_id": torch.device(dev)} if device == "cuda" else {}),
        )
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64 on the process's device)."""
    if not d.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_max(d: Dist, values: list[float]) -> list[float]:
    if not d.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def wrap(module, d: Dist, strategy: str, layers: list | None = None, fp16: bool = False) -> Any:
    """The module DDP- or FSDP-wrapped for training across processes (unchanged for one)."""
    if not d.enabled:
        return module
    if strategy == "fsdp":
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(
            param_dtype=torch.float16 if fp16 else None, reduce_dtype=torch.float32
        )
        for layer in layers or []:
            fully_shard(layer, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [d.local_rank] if d.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=device_ids)


def grad_sync(model, last: bool):
    """Gradients are reduced across processes only on an optimizer step's last micro-batch
    (DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync``)."""
    import contextlib

    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()
