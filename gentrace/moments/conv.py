"""nn.Conv2d: per-sample gradient moments from unfolded inputs, in chunks bounded in memory.

For sample i the weight gradient is G_i = D_i U_i^T with U_i = unfold(a_i) [Cin/g * kh * kw, P]
and D_i = delta_i [Cout, P] (P output positions), per group. It is formed for a chunk of samples
at a time ([c, Cout, Cin/g, kh, kw], c chosen so a chunk stays under CHUNK_BYTES) by the
convolution's own weight-gradient kernel, treating the chunk as one sample with c times the
groups (equal to the unfolded product, without materializing the unfolded input), and reduced at
once into sum, sum of squares and sign counts, so no more than one chunk of per-sample gradients
ever exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from gentrace.moments.accumulator import Stats, add_stats, stats_of

# Per-sample gradients formed at once, at most (they are reduced right away).
CHUNK_BYTES = 64 * 2**20


def chunk_size(per_sample_numel: int, itemsize: int = 4) -> int:
    """Samples per chunk so that a chunk of per-sample gradients stays under CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // max(1, per_sample_numel * itemsize))


def chunked_moments(
    make: Callable[[int, int], torch.Tensor], n: int, per_sample_numel: int | None = None, signs: bool = True
) -> Stats:
    """Reduce per-sample gradients `make(lo, hi)` [hi - lo, *shape] chunk by chunk into moments."""
    first = make(0, min(n, 1))
    step = chunk_size(per_sample_numel or first[0].numel(), first.element_size())
    total = stats_of(first, signs)
    for lo in range(1, n, step):
        total = add_stats(total, stats_of(make(lo, min(n, lo + step)), signs))
    return total


def moments(module: nn.Module, a: torch.Tensor, delta: torch.Tensor, signs: bool = True) -> dict[str, Stats]:
    """Moments of `weight` (and `bias`) of an nn.Conv2d from input a [B, Cin, H, W] and delta [B, Cout, H', W']."""
    assert isinstance(module, nn.Conv2d)
    padding = module.padding
    # engine.rule_for sends string and non-zero padding modes to the fallback
    assert not isinstance(padding, str)
    assert module.padding_mode == "zeros"
    weight = module.weight
    groups = module.groups
    cout, cin_g, kh, kw = weight.shape
    d = delta.flatten(2)  # [B, Cout, P]

    def per_sample(lo: int, hi: int) -> torch.Tensor:
        # The c samples of a chunk as one sample with c * groups groups: the convolution's own
        # weight-gradient kernel then returns every sample's gradient at once (no unfold copy).
        c = hi - lo
        x = a[lo:hi].reshape(1, c * a.shape[1], *a.shape[2:])
        dy = delta[lo:hi].reshape(1, c * cout, *delta.shape[2:])
        g = conv2d_weight(x, (c * cout, cin_g, kh, kw), dy, module.stride, padding, module.dilation, groups * c)
        return g.view(c, cout, cin_g, kh, kw)

    out = {"weight": chunked_moments(per_sample, len(a), weight.numel(), signs)}
    if module.bias is not None:
        out["bias"] = stats_of(d.sum(2), signs)  # [B, Cout]: per-sample bias gradient sums the output positions
    return out
