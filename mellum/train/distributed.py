"""Process groups and sharding: one command for one CPU process, several CPU processes (gloo) or GPUs (nccl).

`torchrun --nproc-per-node N -m mellum.train.pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the
run is a single process and nothing is sharded. With more than one process every transformer block, then the
root, is wrapped with FSDP2 `fully_shard` (parameters sharded along dim 0 as DTensors, gathered per block for
forward and backward, gradients reduce-scattered) — the layout torchtitan uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment, pick the device ("auto": cuda if present), start the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA GPU")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank, world, local_rank, dev)


def shard_model(model: nn.Module, env: DistEnv, bf16: bool = False) -> nn.Module:
    """FSDP2 over all ranks: each block is its own unit (gathered just in time), then the root (embedding, head).

    With `bf16`, parameters are gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy); the
    fp32 master weights and optimizer state stay sharded.
    """
    if not env.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    if getattr(model, "mtp", None) is not None:
        fully_shard(model.mtp, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity on one process); returns the reduced tensor."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
