"""nn.LayerNorm: per-sample gradient moments of the affine weight and bias in closed form.

LayerNorm (Ba et al. 2016, eq. 4) normalizes each position over its last dims N (the normalized
shape): y = x_hat * gamma + beta with x_hat = (x - mean_N x) / sqrt(var_N x + eps). No statistic
crosses samples, so sample i's gradients are exact: gamma's is sum_t delta_it * x_hat_it and beta's
is sum_t delta_it, summed over the positions t between the batch dim and N ([B, *N] each).
"""

from __future__ import annotations

import torch
from torch import nn

from gentrace.moments.accumulator import Stats, stats_of


def moments(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, signs: bool = True) -> dict[str, Stats]:
    """Moments of `weight` and `bias` of an nn.LayerNorm from its input x [B, *, *N] and delta (same shape)."""
    assert isinstance(module, nn.LayerNorm)
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    x_hat = (x - mean) * torch.rsqrt(var + module.eps)
    per_sample = (len(x), -1, *module.normalized_shape)  # [B, positions, *N]
    out = {}
    if module.weight is not None:
        out["weight"] = stats_of((delta * x_hat).reshape(per_sample).sum(1), signs)
    if module.bias is not None:
        out["bias"] = stats_of(delta.reshape(per_sample).sum(1), signs)
    return out
