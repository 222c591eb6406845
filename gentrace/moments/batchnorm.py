"""BatchNorm{1,2,3}d: per-sample gradient moments of the affine weight and bias in closed form.

With x_hat the normalized input, gamma's gradient for sample i is sum_positions delta_i * x_hat_i
and beta's is sum_positions delta_i ([B, C] each). In eval mode x_hat uses the running statistics
and these are the true per-sample gradients. In train mode a sample's loss depends on the whole
batch through the batch statistics, so no gradient belongs to one sample alone; gentrace then
reports the per-sample terms of the batch gradient (x_hat from the batch statistics, delta_i the
batch loss's output gradient for sample i, rescaled to a per-sample loss): they sum exactly to
the batch gradient, and their spread is the one SGD sees. The `probe` source runs in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gentrace.moments.accumulator import Stats, stats_of


def moments(module: nn.Module, inputs: tuple[Any, ...], delta: torch.Tensor) -> dict[str, Stats]:
    """Moments of `weight` and `bias` of a BatchNorm layer from its input [B, C, ...] and delta."""
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    x = inputs[0]
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    use_batch = module.training or not module.track_running_stats or module.running_mean is None
    if use_batch:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        assert module.running_var is not None
        mean, var = module.running_mean, module.running_var
    x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + module.eps)
    d = delta.flatten(2) if delta.dim() > 2 else delta[:, :, None]
    out = {}
    if module.weight is not None and module.weight.requires_grad:
        xh = x_hat.flatten(2) if x_hat.dim() > 2 else x_hat[:, :, None]
        out["weight"] = stats_of((d * xh).sum(2))
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = stats_of(d.sum(2))
    return out
