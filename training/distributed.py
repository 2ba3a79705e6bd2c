"""DDP setup through ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK).

One process per GPU with NCCL, or per CPU process with gloo (how the tests run it).
Without torchrun everything is a single process and no group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def mean_across(d: Dist, values: dict[str, float], keys: list[str]) -> dict[str, float]:
    """Average scalars over the processes that have them (for logging only). Every rank
    passes the same ``keys``; a rank may lack some values (e.g. all its videos failed)."""
    if d.world_size == 1:
        return {k: values[k] for k in keys if k in values}
    sums = [values.get(k, 0.0) for k in keys] + [float(k in values) for k in keys]
    t = torch.tensor(sums, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    n = len(keys)
    return {k: float(t[i] / t[n + i]) for i, k in enumerate(keys) if t[n + i] > 0}


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
