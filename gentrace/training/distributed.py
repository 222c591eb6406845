"""Several processes recording one run under `torchrun` (DistributedDataParallel): who holds which samples.

SPEC section 6. Every rank holds the whole data set and the same replicate models; work is split
by sample, never by model:

- a training batch is the single-process batch (same seeded permutation) cut into `world`
  contiguous pieces, rank r taking rows `bounds(B)[r]`; each rank backpropagates
  sum_{i in its piece} l_i * world / B, so DDP's gradient average is the full batch's mean gradient
  whatever the piece sizes (an uneven last batch included);
- a pass over a fixed sample set (evaluation, probe gradient moments, activation bitmasks) gives
  rank r the same contiguous piece of that set; per-sample rows come back with `gather` in sample
  order, sums with `all_reduce_moments` (the associative merge of `Moments`, done as one summed
  all-reduce per dtype).

Rank 0 alone writes the store; the other ranks compute and exchange but never write. A single
process is `Dist()` (rank 0 of 1): every method is then a no-op, so the one-process code path is the
multi-process one with world = 1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from gentrace.core.config import RunConfig
from gentrace.core.errors import ConfigError
from gentrace.moments.accumulator import Moments, TensorMoments


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment `torchrun` sets; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks of one run; `Dist()` is a single process.

    Attributes:
        rank: global rank, 0 = the one that writes the store.
        world: number of processes.
        local_rank: rank on this node (picks the GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the store and prints."""
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Rows [lo, hi) of an n-row set that `rank` (default: this one) holds: contiguous, sizes differ by <= 1."""
        r = self.rank if rank is None else rank
        return n * r // self.world, n * (r + 1) // self.world

    def shard(self, n: int) -> slice:
        """`bounds(n)` as a slice."""
        lo, hi = self.bounds(n)
        return slice(lo, hi)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) `t` over the ranks, in place; returns it."""
        if self.world > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
        return t

    def gather(self, t: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
        """Every rank's piece `t` (rows `bounds(n)` along `dim`) put back together in sample order, on every rank."""
        if self.world == 1:
            return t
        sizes = [hi - lo for lo, hi in (self.bounds(n, r) for r in range(self.world))]
        rows = t.movedim(dim, 0)
        # all_gather needs equal shapes: pad every piece to the largest one and cut afterwards.
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: len(rows)] = rows
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(pieces, padded)
        return torch.cat([p[:s] for p, s in zip(pieces, sizes, strict=True)]).movedim(0, dim)

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on some rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        return bool(self.all_reduce(t, "max").item())

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank (a small picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_moments(
        self,
        moments: Moments,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
        counts: bool = True,
    ) -> Moments:
        """The moments over the union of every rank's samples, in place on every rank (`Moments.merge` as a sum).

        Tensors that a rank never saw (no sample on it) start as zeros. `counts`: also sum `n` and
        `loss_sum` (False when the caller already keeps them globally).
        """
        if self.world == 1:
            return moments
        for name, shape in shapes.items():
            if name not in moments.tensors:
                moments.tensors[name] = TensorMoments.zeros(shape, device)
        tensors = [moments.tensors[name] for name in shapes]
        # One all-reduce per dtype: float64 sums and sums of squares, int32 sign counts.
        floats = torch.cat([t.sum.flatten() for t in tensors] + [t.sumsq.flatten() for t in tensors])
        ints = torch.cat([t.sign_sum.flatten() for t in tensors] + [t.nonzero.flatten() for t in tensors])
        if counts:
            totals = torch.tensor([moments.loss_sum, moments.n], dtype=torch.float64, device=device)
            floats = torch.cat([floats, totals])
        self.all_reduce(floats)
        self.all_reduce(ints)
        sizes = [t.sum.numel() for t in tensors]
        sums, ints_split = floats.split([*sizes, *sizes, len(floats) - 2 * sum(sizes)]), ints.split(sizes * 2)
        for k, t in enumerate(tensors):
            t.sum.copy_(sums[k].view_as(t.sum))
            t.sumsq.copy_(sums[len(sizes) + k].view_as(t.sumsq))
            t.sign_sum.copy_(ints_split[k].view_as(t.sign_sum))
            t.nonzero.copy_(ints_split[len(sizes) + k].view_as(t.nonzero))
        if counts:
            moments.loss_sum, moments.n = float(floats[-2]), int(floats[-1])
        return moments


def check_config(cfg: RunConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """Refuse what several processes cannot record as one would; returns the model with SyncBatchNorm.

    BatchNorm in train mode normalizes by the statistics of the whole batch, which under DDP only
    SyncBatchNorm computes, and SyncBatchNorm runs on GPUs only.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        raise ConfigError(
            f"model.arch = {cfg.model.arch!r} has BatchNorm layers, which under torchrun need SyncBatchNorm, "
            "and that runs on GPUs only; record it with one process or on GPUs"
        )
    grad = cfg.record.grad_moments
    if grad.source == "train-batches" and (grad.every_steps or grad.every_epochs):
        raise ConfigError(
            "record.grad_moments.source = 'train-batches' with BatchNorm under torchrun would give per-sample "
            "terms from each rank's own batch statistics; use source = 'probe' or one process"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def resolve(device: str, dist: Dist) -> torch.device:
    """The device of this rank: under torchrun `auto`/`cuda` mean cuda:LOCAL_RANK; cuda:N is refused."""
    if dist.world == 1:
        raise AssertionError("resolve() is for several processes; run.resolve_device handles one")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, cpu or auto"
        )
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA GPU; use --device cpu")
    if dist.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {dist.local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
            "lower torchrun's --nproc-per-node"
        )
    return torch.device("cuda", dist.local_rank)


@contextlib.contextmanager
def session(device: str) -> Iterator[tuple[Dist, torch.device | None]]:
    """Join the process group torchrun set up (nccl on GPUs, gloo on CPUs); leave it on exit.

    Yields (Dist(), None) in a single process: the caller resolves its device as usual.
    """
    rank, world, local_rank = launched_world()
    dist = Dist(rank, world, local_rank)
    if world == 1:
        yield dist, None
        return
    dev = resolve(device, dist)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    # nccl: bind the process group to this rank's GPU (collectives then never guess the device)
    bind: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
    tdist.init_process_group(backend, timeout=dt.timedelta(minutes=30), **bind)
    try:
        yield dist, dev
        tdist.barrier()  # leave together: rank 0 may still be writing the store
    finally:
        # The DDP wrapper (a reference cycle) keeps the process group alive past destroy_process_group
        # until a garbage collection; left to interpreter shutdown, gloo's threads then abort the
        # process ("terminate called without an active exception").
        gc.collect()
        tdist.destroy_process_group()
