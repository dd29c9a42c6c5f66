"""Multi-process data-parallel training with torch.distributed (DDP), or a single process.

Launch with ``torchrun --nproc_per_node=N ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` then joins the
process group with ``gloo`` on the CPU and ``nccl`` on CUDA. Without those variables (or with
``WORLD_SIZE=1``) everything runs in one process and the helpers here are no-ops.

Sharding is *within* each batch: every rank reads the same batch and keeps its contiguous
slice (:meth:`DistContext.shard`). With the loss of each slice weighted by its share of the batch
(:meth:`DistContext.loss_weight`), DDP's gradient average equals the single-process gradient of
the whole batch, so N processes take the same steps as one, up to floating-point summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank, backend, and whether it joined the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # True when init_distributed created the group (and close() ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """True on rank 0, the process that writes files."""
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's contiguous slice of a batch of ``batch_size`` (may be empty for tiny batches)."""
        base, extra = divmod(batch_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def loss_weight(self, shard_size: int, batch_size: int) -> float:
        """Factor on this rank's mean loss so DDP's gradient average is the whole batch's gradient."""
        return shard_size * self.world_size / batch_size

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (``sum``, ``min`` or ``max``) across ranks; returns ``tensor``."""
        if self.enabled:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_primary_process() -> bool:
    """True unless this is a torchrun worker with ``RANK`` > 0 (the process that must not write records)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def training_device(device: torch.device | str | None) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for CUDA under torchrun, else ``device``."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device: torch.device) -> DistContext:
    """Join (or reuse) the process group described by the torchrun environment.

    Reuses a group the caller already initialized; otherwise initializes one with ``nccl`` when
    ``device`` is CUDA and ``gloo`` otherwise, and marks it as owned. Returns a single-process
    context when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                           dist.get_backend(), owns_group=False)
    world = env_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend, owns_group=True)
