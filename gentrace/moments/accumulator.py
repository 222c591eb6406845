"""Moment accumulators: float64 sums and int64 counts that merge associatively.

Float64 because a sum of g^2 over tens of thousands of samples loses digits in float32; the store
keeps float32/int32. `merge` is what multi-process all-reduce and resumed accumulation rely on:
merging the moments of disjoint sample sets equals accumulating over their union.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TensorMoments:
    """Moments of one parameter tensor over the samples seen so far.

    Attributes:
        sum: [*shape] float64, sum_i g_i.
        sumsq: [*shape] float64, sum_i g_i^2.
        pos: [*shape] int64, #{i : g_i > 0}.
        neg: [*shape] int64, #{i : g_i < 0}.
    """

    sum: torch.Tensor
    sumsq: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor

    @classmethod
    def zeros(cls, shape: torch.Size | tuple[int, ...], device: torch.device) -> TensorMoments:
        """Empty accumulator for a tensor of `shape`."""
        f = torch.zeros(shape, dtype=torch.float64, device=device)
        i = torch.zeros(shape, dtype=torch.int64, device=device)
        return cls(f, f.clone(), i, i.clone())

    def add(self, s: torch.Tensor, sq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> None:
        """Add one batch's moments (any float dtype for the sums, exact integer-valued counts)."""
        self.sum += s.to(torch.float64)
        self.sumsq += sq.to(torch.float64)
        self.pos += pos.round().to(torch.int64) if pos.is_floating_point() else pos.to(torch.int64)
        self.neg += neg.round().to(torch.int64) if neg.is_floating_point() else neg.to(torch.int64)

    def merge(self, other: TensorMoments) -> TensorMoments:
        """Moments of the union of two disjoint sample sets (a new object; associative, commutative)."""
        return TensorMoments(self.sum + other.sum, self.sumsq + other.sumsq, self.pos + other.pos, self.neg + other.neg)


@dataclass
class Moments:
    """Moments of every tracked parameter plus the sample count and the summed loss.

    Attributes:
        tensors: parameter name -> TensorMoments.
        n: number of samples accumulated.
        loss_sum: sum of the per-sample losses (float64).
    """

    tensors: dict[str, TensorMoments] = field(default_factory=dict)
    n: int = 0
    loss_sum: float = 0.0

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of two disjoint sample sets."""
        names = self.tensors.keys() | other.tensors.keys()
        merged = {}
        for name in names:
            if name in self.tensors and name in other.tensors:
                merged[name] = self.tensors[name].merge(other.tensors[name])
            else:
                merged[name] = self.tensors.get(name) or other.tensors[name]
        return Moments(merged, self.n + other.n, self.loss_sum + other.loss_sum)
