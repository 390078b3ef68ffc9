"""Single-process and torchrun (DDP) training context, and a weighted, rank-sharded sampler.

``torchrun --nproc_per_node=K -m edge.cli train ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; then the process group is initialised (NCCL on CUDA, gloo on CPU), each rank
draws its own share of every epoch's samples, and only rank 0 evaluates and writes files.
With debug logging (``mededge -v``) each rank logs the sample indices of its shard per epoch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly one-process) training job."""

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


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU; otherwise as given.

    Raises:
        ValueError: a CUDA device was asked for but CUDA is not available.
    """
    if flag == "auto":
        flag = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(flag)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: CUDA is not available on this machine")
    return device


def setup(device_flag: str = "auto") -> DistContext:
    """Initialise the process group when ``WORLD_SIZE`` > 1, and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


class ShardedWeightedSampler(Sampler[int]):
    """Draws ``num_samples`` indices per epoch with replacement, in proportion to ``weights``,
    and gives rank ``r`` of ``w`` every ``w``-th of them: a DistributedSampler that also
    rebalances classes. The draw depends only on (seed, epoch), so every rank agrees and a
    resumed run repeats it.
    """

    def __init__(self, weights: np.ndarray, num_samples: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        w = np.asarray(weights, np.float64)
        if w.ndim != 1 or w.size == 0 or not np.all(w >= 0) or w.sum() <= 0:
            raise ValueError("sampler: weights must be a non-empty, non-negative vector")
        self._p = w / w.sum()
        self._per_rank = math.ceil(num_samples / world_size)
        self._rank, self._world, self._seed, self._epoch = rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        return self._per_rank

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self._seed, self._epoch])
        draw = rng.choice(self._p.size, size=self._per_rank * self._world, p=self._p)
        shard = [int(i) for i in draw[self._rank::self._world]]
        log.debug("sampler rank %d/%d epoch %d: %s", self._rank, self._world, self._epoch,
                  " ".join(map(str, shard)))
        return iter(shard)
