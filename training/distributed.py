"""Data-parallel training over ``torch.distributed`` (one process per rank, as ``torchrun``
starts them): which rows and which noise each rank takes, and its networks wrapped in
``DistributedDataParallel`` so that their gradients are averaged over the ranks.

The rule that makes ``world_size`` ranks with minibatches of ``b`` rows take the same first
step as one process with minibatches of ``world_size * b``: every rank draws the same epoch
order and the same latent noise for the whole global minibatch, from one shared seed, and
keeps its own contiguous part of both (:meth:`Shard.part`). With equal parts, DDP's mean of
the ranks' mean losses is the global minibatch's mean loss.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Shard:
    """This process's rank among ``world_size`` data-parallel ranks."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and saves the model."""
        return self.rank == 0

    def part(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of ``rows`` (split as evenly as possible)."""
        return torch.tensor_split(rows, self.world_size)[self.rank]

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag made true on every rank where it is true on any one, so that all ranks
        leave an epoch, roll back or stop at the same minibatch (a rank that left alone
        would leave the others waiting in a collective forever)."""
        votes = torch.tensor([float(f) for f in flags], device=_collective_device())
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in votes.tolist())


    def shared_seed(self) -> int:
        """A random seed drawn on rank 0 and received by every rank."""
        seed = torch.randint(0, 2**31 - 1, (1,), device=_collective_device())
        dist.broadcast(seed, src=0)
        return int(seed.item())

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        dist.destroy_process_group()


def current_shard() -> Shard | None:
    """The running process group's shard, or None outside one (or in a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size()
    return None if world_size == 1 else Shard(dist.get_rank(), world_size)


def _collective_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_environment(device: str = "auto") -> Shard | None:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL when training on
    CUDA, gloo on CPU; on CUDA each process takes the GPU of its ``LOCAL_RANK``. Returns the
    shard, or None when the environment describes no group of more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return current_shard()


class GlobalMinibatch:
    """This rank's view of the global minibatch it steps on a part of: the seeded latent
    draws of the training step, each rank taking its part of one draw for the whole global
    minibatch (see the module's docstring), and what needs every rank's rows (the rows a
    trimmed loss leaves out).

    ``generator`` is the generator every rank holds in the same state; :meth:`begin` tells
    it the global minibatch's size before each step.
    """

    def __init__(self, generator: torch.Generator | None, shard: Shard):
        self.generator = generator
        self.shard = shard
        self._global_rows = 0

    def begin(self, global_rows: int) -> None:
        self._global_rows = global_rows

    def normal(self, like: torch.Tensor, share: float = 1.0) -> torch.Tensor:
        """This rank's rows of a ``(ceil(share * global rows), like.shape[1])`` draw; at
        least one row per rank, so that no rank takes the mean of nothing."""
        total = max(self.shard.world_size, math.ceil(share * self._global_rows))
        draw = torch.randn((total, like.shape[1]), generator=self.generator,
                           device=like.device, dtype=like.dtype)
        return self.shard.part(draw)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` ``(its rows,)`` in rank order: the global minibatch's."""
        sizes = [len(p) for p in torch.tensor_split(torch.empty(self._global_rows),
                                                    self.shard.world_size)]
        padded = torch.zeros(max(sizes), dtype=values.dtype, device=values.device)
        padded[:len(values)] = values
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's part of the global minibatch's ``values``."""
        return self.shard.part(values)


@dataclass
class Replicas:
    """The networks as the training step calls them under data parallelism: each one that
    trains wrapped in ``DistributedDataParallel``. The step reads ``encoder``, ``generator``
    and ``energy`` from it as from :class:`training.networks.Networks`."""

    encoder: nn.Module
    generator: nn.Module
    energy: nn.Module | None

    @classmethod
    def wrap(cls, networks: nn.Module) -> Replicas:
        """DDP over each network. DDP's constructor copies rank 0's parameters and buffers to
        every rank, so all ranks start from one model. Buffers are not synced again on each
        forward: the only ones are spectral normalisation's power-iteration vectors, which
        depend on the (identical) weights alone."""
        def ddp(module: nn.Module | None) -> nn.Module | None:
            if module is None:
                return None
            return DistributedDataParallel(module, forward_sync_buffers=False)

        return cls(ddp(networks.encoder), ddp(networks.generator), ddp(networks.energy))


def unwrapped(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (or ``module`` itself): for calls that must not
    count as the wrapper's forward pass, such as a second call before the backward pass or a
    call to one of the network's own methods."""
    return module.module if isinstance(module, DistributedDataParallel) else module
