"""Distributed data-parallel training helpers: process group from torchrun's environment, rank and world
size, sharding, seeds, collectives, and failure propagation.

``torchrun --nproc_per_node=N train_seg.py ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; ``setup`` reads them and joins the process group (NCCL on CUDA,
one GPU per process chosen by ``LOCAL_RANK``; Gloo on CPU).  Without them (or with ``WORLD_SIZE=1``)
it returns a single-process context whose collectives are no-ops, so the single-process run is exactly
the run it was before distributed training existed.

Failures: a step that raises on one rank while the others wait in a collective would hang them until
the process-group timeout.  ``DistContext.guard`` runs a block on every rank and then all-reduces a
failure flag: if any rank failed, every rank raises (the failing one its own exception, the others a
``RankFailure`` naming it), so the whole job stops at once with a clear message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from seg.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RankFailure(RuntimeError):
    """Raised on the ranks that did not fail when another rank's step raised."""


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed; rank 0 keeps ``seed`` itself (so one process reproduces the non-DDP run)."""
    return seed if rank == 0 else (seed + rank * 0x9E3779B1) % 2**31


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin share of ``items`` for ``rank``: items rank, rank + W, rank + 2W, ..."""
    return list(items[rank::world_size])


def train_shard(cases: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The training cases ``rank`` samples from.

    Cases are dealt round robin by index (``shard``), so the shards are disjoint and differ in size by
    at most one case.  With fewer cases than ranks a disjoint shard would leave some rank empty;
    then every rank samples from *all* cases (its stream still has its own seed, so the ranks draw
    different patches) and a warning says so.
    """
    if not cases:
        raise ValueError("no training cases")
    if len(cases) < world_size:
        if rank == 0:
            log.warning("%d training cases for %d processes: every process samples from all cases "
                        "(with its own seed) instead of a disjoint shard", len(cases), world_size)
        return list(cases)
    return shard(cases, rank, world_size)


@dataclasses.dataclass
class DistContext:
    """This process's place in the job.  ``world_size == 1``: no process group, no-op collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we created the process group (and destroy it in ``close``)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops on one process) -------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (a decision all ranks must share)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average float values over the ranks (every rank must pass the same keys)."""
        if not self.distributed:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run the block on every rank, then stop all ranks if it raised on any.

        Every rank must enter the guard (it ends with a collective).  The rank that failed re-raises
        its own exception; the others raise ``RankFailure`` with the failing ranks and their errors.
        ``BaseException``s (KeyboardInterrupt, SystemExit) are not caught: torchrun stops the job.
        """
        if not self.distributed:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
        if self.any(error is not None):
            messages = self.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
            failed = [(r, m) for r, m in enumerate(messages) if m is not None]
            if error is not None:
                raise error
            detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise RankFailure(f"stopping: {what} failed on {len(failed)} of {self.world_size} "
                              f"processes ({detail})")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def resolve_process_device(device: torch.device, local_rank: int) -> torch.device:
    """A CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process); CPU stays CPU."""
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible: "
                          "start at most one process per GPU (torchrun --nproc_per_node)")
    if device.index is not None and device.index != local_rank:
        log.warning("train.device=%s ignored under torchrun: process %d uses cuda:%d",
                    device, local_rank, local_rank)
    return torch.device("cuda", local_rank)


def setup(device: torch.device, timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Args:
        device: the device the single-process run would use (``train.device`` resolved); under
            torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` and the backend NCCL, CPU uses Gloo.
        timeout_minutes: process-group timeout, the last resort against a rank that hangs outside
            ``DistContext.guard`` (validation of large volumes on slow ranks must fit in it).

    Returns:
        The context; single-process (no group) when ``WORLD_SIZE`` is unset or 1.  A group already
        initialised by the caller is used as it is (and not destroyed by ``close``).
    """
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        device = resolve_process_device(device, local) if dist.get_world_size() > 1 else device
        return DistContext(dist.get_rank(), dist.get_world_size(), local, device, owns_group=False)
    world = env_world_size()
    if world <= 1:
        return DistContext(device=device)
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_process_device(device, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes if timeout_minutes > 0 else 30.0)
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    log.info("process %d of %d (%s, %s)", rank, world, backend, device)
    return DistContext(rank, world, local, device, owns_group=True)


def wrap_model(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when distributed, else ``module`` itself.

    ``find_unused_parameters=True``: some heads leave backbone stages out of the loss (the 'mask'
    head reads the finest level only); DDP then marks those parameters ready itself (they keep no
    gradient, as on one process).
    """
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=True)


def convert_sync_batchnorm(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """BatchNorm layers -> ``nn.SyncBatchNorm`` (statistics over the global batch); CUDA only.

    The parameters are the same objects (an optimiser built before stays valid) and the state-dict
    keys do not change, so checkpoints load into the plain-BatchNorm model.
    """
    if not ctx.distributed:
        return model
    if ctx.device.type != "cuda":
        raise ConfigError("train.sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm has no "
                          "CPU implementation); set it to False for CPU training")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
