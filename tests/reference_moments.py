"""Slow, obvious reference for per-sample gradient moments: one backward per sample, float64."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def per_sample_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """name -> [n, *shape] float64: the gradient of each sample's own loss, by a Python loop."""
    ref = copy.deepcopy(model).double()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = [p for p in ref.parameters() if p.requires_grad]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(len(x)):
        xi = x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1]
        value = loss(ref(xi), y[i : i + 1]).sum()
        for name, g in zip(names, torch.autograd.grad(value, params, allow_unused=True), strict=True):
            rows[name].append(torch.zeros_like(params[names.index(name)]) if g is None else g)
    return {n: torch.stack(v) for n, v in rows.items()}


def moments_of(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum, sum of squares, #>0, #<0 over the sample axis of [n, *shape]."""
    return grads.sum(0), grads.square().sum(0), (grads > 0).sum(0), (grads < 0).sum(0)
