"""Distributed data-parallel plumbing for ``polydet.train.engine`` (torchrun / DDP).

One process per device. ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; when
they are absent everything degrades to a single process with no process group, so the
training loop has a single code path. The backend is NCCL on CUDA and gloo on CPU (which
is what the tests use to prove DDP on a machine without GPUs).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: ``rank`` of ``world_size``, ``local_rank`` on its host."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group (NCCL for CUDA devices, gloo for CPU); no-op for one process."""
    if not info.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # NCCL needs the device bound to the process group to avoid a device guess.
        dist.init_process_group(backend=backend, device_id=device)
    else:
        dist.init_process_group(backend=backend)


def cleanup_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: Tensor, info: DistInfo) -> Tensor:
    """Sum of ``values`` over the ranks (the tensor itself for one process)."""
    if info.distributed and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not (info.distributed and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def average_buffers(module: nn.Module, info: DistInfo) -> None:
    """Make every rank's buffers equal: floating ones (BatchNorm running statistics) become
    their mean over the ranks, the others (batch counters) rank 0's.

    DDP broadcasts rank 0's buffers at the *start* of each forward, so after the last step
    every rank holds the statistics of its own last batch; checkpoints, validation and the
    final model need one agreed set.
    """
    if not (info.distributed and dist.is_initialized()):
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(info.world_size)
        else:
            dist.broadcast(buf, src=0)


class ResumableSampler(DistributedSampler):
    """A seeded ``DistributedSampler`` that can start mid-epoch and tags items with the epoch.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` (as in
    ``DistributedSampler``), sharded over the ranks; :meth:`set_position` skips the first
    ``start`` items of this rank's shard, which is how a resumed run continues with exactly
    the batches an uninterrupted one would have seen. Items are ``(epoch, index)`` pairs so
    that :class:`SeededItems` can derive each sample's augmentation seed from them.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this rank's ``start``-th item on."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def state_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes).

    Equal digests mean bit-identical weights: DDP ranks compare them at the end of training.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
