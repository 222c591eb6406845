"""Which samples this process holds among the ranks of a torchrun launch, and how pieces are combined.

SPEC section 6; the launch itself (process group, devices, what several processes refuse) is
gentrace.training.distributed. Probes and the training loop split their passes with `Dist` and combine
the pieces: per-sample rows with `gather` (in sample order), sums with `all_reduce_moments` (the
associative merge of `Moments`, one summed all-reduce per dtype). `Dist()` is a single process (rank 0
of 1): every method is then a no-op, so the one-process code path is the multi-process one with world = 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from gentrace.moments.accumulator import Moments, TensorMoments


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
