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
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from gentrace.core.config import RunConfig
from gentrace.core.errors import ConfigError
from gentrace.record.ranks import Dist


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment `torchrun` sets; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def local_world() -> int:
    """The torchrun ranks on this node, from `LOCAL_WORLD_SIZE` (1 in a single process)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if launched_world()[1] > 1 and value.isdigit() and int(value) > 0 else 1


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
