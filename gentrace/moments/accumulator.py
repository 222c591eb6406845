"""Moment accumulators: float64 sums and sign counts that merge associatively.

Float64 because a sum of g^2 over tens of thousands of samples loses digits in float32; the store
keeps float32/int32. Counts are kept as sign_sum = pos - neg and nonzero = pos + neg (int32), the
two quantities the Linear rule gets from its GEMMs, so adding a batch is one in-place kernel per
accumulator, without a conversion for the counts. `merge` is what multi-process all-reduce and resumed
accumulation rely on: merging the moments of disjoint sample sets equals accumulating over their union.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# (sum, sumsq, sign_sum, nonzero) of one batch, any float dtype; counts integer-valued; the
# counts are None when an engine was asked for sums only (signs=False).
Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def stats_of(g: torch.Tensor, signs: bool = True) -> Stats:
    """Moments of explicit per-sample gradients g [c, *shape] (the chunked rules)."""
    # One float64 copy, squared in place: reducing it is about twice as fast as sum(dtype=float64)
    # of the float32 tensor (which converts as it goes); the counts of +-1 are exact in float32 below 2^24.
    d = g.double()
    s = d.sum(0)
    sq = (d.square_() if d is not g else d.square()).sum(0)
    if not signs:
        return s, sq, None, None
    sign = g.sign()
    # summed in float32 (exact to 2^24) whatever g's dtype: a bfloat16 sum holds integers only to 256
    f32 = torch.float32
    return s, sq, sign.sum(0, dtype=f32).to(torch.int32), sign.abs_().sum(0, dtype=f32).to(torch.int32)


def pos_neg(sign_sum: np.ndarray, nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """#{g_i > 0} and #{g_i < 0} from sign_sum = pos - neg and nonzero = pos + neg (integer arrays; sums even)."""
    return (nonzero + sign_sum) >> 1, (nonzero - sign_sum) >> 1


def add_stats(total: Stats | None, more: Stats) -> Stats:
    """Add `more` to `total` element by element, in place (None entries stay None); returns the sum."""
    if total is None:
        return more
    s, sq, sign_sum, nonzero = total
    s.add_(more[0])
    sq.add_(more[1])
    if sign_sum is not None and more[2] is not None:
        sign_sum.add_(more[2])
    if nonzero is not None and more[3] is not None:
        nonzero.add_(more[3])
    return total


class TensorMoments:
    """Moments of one parameter tensor over the samples seen so far.

    Attributes:
        sum: [*shape] float64, sum_i g_i.
        sumsq: [*shape] float64, sum_i g_i^2.
        sign_sum: [*shape] int32, #{g_i > 0} - #{g_i < 0}.
        nonzero: [*shape] int32, #{g_i != 0} (so at most 2^31 - 1 samples per accumulation).

    The first batch after a reset is kept as it came (float32 GEMM results) and only folded into
    the float64 accumulators when a second batch arrives or a value is read: a one-batch
    accumulation then costs no conversion pass, and a reset costs nothing until it matters.
    """

    def __init__(self, sum: torch.Tensor, sumsq: torch.Tensor, sign_sum: torch.Tensor, nonzero: torch.Tensor) -> None:
        self._acc = [sum, sumsq, sign_sum, nonzero]
        self._first: Stats | None = None
        self._stale = False  # the accumulators hold old values that count as zero

    @classmethod
    def zeros(cls, shape: torch.Size | tuple[int, ...], device: torch.device) -> TensorMoments:
        """Empty accumulator for a tensor of `shape`."""
        f = torch.zeros(shape, dtype=torch.float64, device=device)
        i = torch.zeros(shape, dtype=torch.int32, device=device)
        empty = cls(f, f.clone(), i, i.clone())
        empty._stale = True  # lets the first batch stay unconverted
        return empty

    def _settled(self) -> list[torch.Tensor]:
        if self._stale:
            for acc in self._acc:
                acc.zero_()
            self._stale = False
        if self._first is not None:
            first, self._first = self._first, None
            self.add(first)
        return self._acc

    @property
    def sum(self) -> torch.Tensor:
        """sum_i g_i [*shape] float64."""
        return self._settled()[0]

    @property
    def sumsq(self) -> torch.Tensor:
        """sum_i g_i^2 [*shape] float64."""
        return self._settled()[1]

    @property
    def sign_sum(self) -> torch.Tensor:
        """#{g_i > 0} - #{g_i < 0} [*shape] int32."""
        return self._settled()[2]

    @property
    def nonzero(self) -> torch.Tensor:
        """#{g_i != 0} [*shape] int32."""
        return self._settled()[3]

    @property
    def pos(self) -> torch.Tensor:
        """#{i : g_i > 0} [*shape] int64."""
        return ((self.nonzero + self.sign_sum) // 2).to(torch.int64)

    @property
    def neg(self) -> torch.Tensor:
        """#{i : g_i < 0} [*shape] int64."""
        return ((self.nonzero - self.sign_sum) // 2).to(torch.int64)

    def moment(self, name: str) -> torch.Tensor:
        """The moment the store keeps under `name` (sum, sumsq, pos, neg: gentrace.store.schema.GRAD.MOMENTS)."""
        by_name = {
            "sum": lambda: self.sum,
            "sumsq": lambda: self.sumsq,
            "pos": lambda: self.pos,
            "neg": lambda: self.neg,
        }
        if name not in by_name:
            raise KeyError(f"no gradient moment {name!r}; one of {', '.join(by_name)}")
        return by_name[name]()

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum, sumsq, sign_sum, nonzero) as a grad row keeps them: float32 sums, int32 counts (split by `pos_neg`).

        One batch so far: the batch's own values, with no float64 pass (float32 -> float64 -> float32
        is the identity); more: the float64 accumulators cast once.
        """
        first = self._first if self._stale else None
        if first is None:
            s, sq, sign_sum, nonzero = self._settled()
            return s.to(torch.float32), sq.to(torch.float32), sign_sum, nonzero
        s, sq = first[0].to(torch.float32), first[1].to(torch.float32)
        if first[2] is None or first[3] is None:  # sums only (signs=False): the counts stay 0
            zeros = torch.zeros(s.shape, dtype=torch.int32, device=s.device)
            return s, sq, zeros, zeros
        return s, sq, first[2].to(torch.int32), first[3].to(torch.int32)

    def zero_(self) -> None:
        """Reset (lazily: an engine reuses its accumulators, and large float64 writes are slow)."""
        self._first = None
        self._stale = True

    def add(self, stats: Stats) -> None:
        """Add one batch's (sum, sumsq, sign_sum, nonzero), converting to float64 / int32 inside the add."""
        if self._stale and self._first is None:
            self._first = stats
            return
        accs = self._settled()
        for acc, value in zip(accs, stats, strict=True):
            if value is not None:
                acc.add_(value)

    def merge(self, other: TensorMoments) -> TensorMoments:
        """Moments of the union of two disjoint sample sets (a new object; associative, commutative)."""
        return TensorMoments(
            self.sum + other.sum,
            self.sumsq + other.sumsq,
            self.sign_sum + other.sign_sum,
            self.nonzero + other.nonzero,
        )

    def __repr__(self) -> str:
        return f"TensorMoments(shape={tuple(self._acc[0].shape)})"


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
        merged = {}
        for name in self.tensors.keys() | other.tensors.keys():
            mine, theirs = self.tensors.get(name), other.tensors.get(name)
            merged[name] = mine.merge(theirs) if mine and theirs else mine or theirs
        return Moments(merged, self.n + other.n, self.loss_sum + other.loss_sum)  # type: ignore[arg-type]
