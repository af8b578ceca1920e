"""Single process or torchrun: process group, device, data sharding and small collectives.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group uses gloo on CPU and nccl on GPU; each rank
trains on its DistributedSampler shard with ``global batch // world size`` images per step. A single
process uses the same sampler with one replica, so a run's data order depends only on the seed and the
epoch (which is also what makes ``--resume`` exact).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["DistInfo", "setup", "teardown", "resolve_device", "shard", "all_sum", "same_on_all_ranks"]


@dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | None, info: DistInfo) -> torch.device:
    """``--device`` (default cuda when available); under torchrun a GPU run uses ``cuda:LOCAL_RANK``."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
        if info.enabled:
            device = torch.device("cuda", info.local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; valid: cpu, cuda, cuda:N")
    return device


def setup(device_name: str | None) -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by torchrun; return the rank info and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        info = DistInfo()
        return info, resolve_device(device_name, info)
    info = DistInfo(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, info)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def train_sampler(dataset: Dataset, info: DistInfo, seed: int) -> DistributedSampler:
    """Shuffled per epoch from ``seed + epoch`` (call ``set_epoch``); rank r takes every world-th index
    of the permutation, so the ranks' batches of one step together are the single-process batch."""
    return DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed, drop_last=False
    )


def shard(dataset: Dataset, info: DistInfo) -> Dataset:
    """Rank r's evaluation shard: indices r, r + W, r + 2W, ... (no padding, so counts add up exactly)."""
    if not info.enabled:
        return dataset
    return Subset(dataset, range(info.rank, len(dataset), info.world_size))


def all_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum numbers over the ranks (float64)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_true(flag: bool, device: torch.device, info: DistInfo) -> bool:
    """True when ``flag`` is true on every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def same_on_all_ranks(obj: Any, info: DistInfo) -> bool:
    """Whether every rank holds an equal ``obj`` (e.g. a method's structural state)."""
    if not info.enabled:
        return True
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return all(g == gathered[0] for g in gathered)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
