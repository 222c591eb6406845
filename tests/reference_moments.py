"""Slow, obvious reference for per-sample gradient moments: one backward per sample, float64."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

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


def assert_moments_equal(moments: Any, reference: dict[str, torch.Tensor], resolution: float = 1e-9) -> Any:
    """gentrace's Moments equal the moments of per-sample gradients [n, *shape]: float32 precision, counts exactly.

    The counts are compared on every entry whose per-sample gradients are each either exactly 0 or
    clearly not 0 (above `resolution` times the tensor's largest): an entry whose exact gradient is 0
    but that both sides compute as rounding noise (attention's key bias, to which softmax is
    invariant) has no defined sign. A deep model's sums can cancel to below float32's resolution
    (a 3x3 kernel's border tap on a ResNet's 1 x 1 feature maps: -5e-10 against a largest 0.44); its
    tests pass float32's epsilon. `resolution = 0` compares every count. Returns the names of the
    tensors that had such entries.
    """
    assert set(moments.tensors) == set(reference)
    noisy = set()
    for name, grads in reference.items():
        s, sq, pos, neg = moments_of(grads)
        got = moments.tensors[name]
        scale = grads.abs().max().item() + 1e-30
        torch.testing.assert_close(got.sum, s, rtol=1e-5, atol=1e-6 * scale * len(grads), msg=name)
        torch.testing.assert_close(got.sumsq, sq, rtol=1e-5, atol=1e-6 * scale**2 * len(grads), msg=name)
        signed = ((grads == 0) | (grads.abs() > resolution * scale)).all(0)
        if not signed.all():
            noisy.add(name)
        assert torch.equal(got.pos[signed], pos[signed]), name
        assert torch.equal(got.neg[signed], neg[signed]), name
    return noisy
