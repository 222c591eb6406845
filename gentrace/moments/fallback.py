"""Any other parameterized module: per-sample gradients by torch.func (vmap over grad), in chunks.

For sample i, g_i = d/dtheta <m(theta, x_i), delta_i>: the vector-Jacobian product of the module
alone at its own input with the sample's output gradient. This is exact whenever the module
treats samples independently (LayerNorm, Embedding, BatchNorm in eval mode, any conv); see
`engine.py` for BatchNorm in train mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gentrace.moments.accumulator import Stats, add_stats, stats_of
from gentrace.moments.conv import chunk_size


def moments(module: nn.Module, inputs: tuple[Any, ...], delta: torch.Tensor) -> dict[str, Stats]:
    """Moments of every direct parameter of `module` from its positional inputs and delta [B, ...]."""
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    buffers = dict(module.named_buffers(recurse=False))

    def inner(p: dict[str, torch.Tensor], x: tuple[Any, ...], d: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, (p, buffers), tuple(t[None] for t in x))
        return (out * d[None]).sum()

    per_sample = vmap(grad(inner), in_dims=(None, 0, 0))
    n = len(delta)
    step = chunk_size(sum(p.numel() for p in params.values()))
    acc: dict[str, Stats] = {}
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        grads = per_sample(params, tuple(t[lo:hi] for t in inputs), delta[lo:hi])
        for name, g in grads.items():
            acc[name] = add_stats(acc.get(name), stats_of(g))
    return acc
