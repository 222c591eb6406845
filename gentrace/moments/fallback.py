"""Any other owner: per-sample gradients by torch.func (vmap over grad), in chunks.

For sample i, g_i = d/dtheta sum_k <out_k(theta, x_i), delta_ik>: the vector-Jacobian product of
the owner's call alone, at its own inputs, with the sample's gradients of its outputs out_k. This is
exact whenever the call treats samples independently (LayerNorm, Embedding, attention, BatchNorm in
eval mode, a whole block in eval mode). For an owner with children (a class token registered on
the model) theta is its own parameters only and the call is rerun through the children, whose
parameters are held fixed; it cannot replay dropout masks or batch statistics, so train mode with
those below it is refused (use the `probe` source, which runs in eval mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from gentrace.core.errors import ConfigError
from gentrace.moments.accumulator import Stats, add_stats, stats_of
from gentrace.moments.conv import chunk_size

# A per-sample call: (the owned parameters, one sample's input leaves) -> its output (a pytree of tensors).
SampleCall = Callable[[dict[str, torch.Tensor], list[Any]], Any]


def vmap_moments(
    call: SampleCall,
    params: dict[str, torch.Tensor],
    leaves: Sequence[Any],
    in_dims: Sequence[int | None],
    delta: Sequence[torch.Tensor | None],
    delta_dims: Sequence[int],
    signs: bool = True,
) -> dict[str, Stats]:
    """Moments of `params` over the samples of one call, chunked so per-sample gradients stay bounded.

    Args:
        call: runs one sample; the input leaves it gets have their batch dim removed (vmap).
        params: name -> tensor [*shape], the parameters to differentiate.
        leaves: the call's input leaves (tensors or not).
        in_dims: each input leaf's batch dim, or None (shared by all samples).
        delta: gradient of the loss for each leaf of the call's output, or None (no gradient).
        delta_dims: each output leaf's batch dim.
        signs: False: sums only.

    Returns:
        name -> Stats over the B samples.
    """
    live = [k for k, d in enumerate(delta) if d is not None]

    def objective(p: dict[str, torch.Tensor], x: list[Any], d: list[torch.Tensor]) -> torch.Tensor:
        out = tree_flatten(call(p, x))[0]
        total = torch.zeros((), dtype=d[0].dtype, device=d[0].device)
        for k, dk in zip(live, d, strict=True):
            total = total + (out[k] * dk.unsqueeze(delta_dims[k])).sum()
        return total

    dims = [delta_dims[k] for k in live]
    per_sample = vmap(grad(objective), in_dims=(None, list(in_dims), dims))
    first = delta[live[0]]
    assert first is not None
    n = first.shape[dims[0]]
    step = chunk_size(sum(p.numel() for p in params.values()))
    acc: dict[str, Stats] = {}
    for lo in range(0, n, step):
        size = min(n, lo + step) - lo
        x = [t if dim is None else t.narrow(dim, lo, size) for t, dim in zip(leaves, in_dims, strict=True)]
        d = [delta[k].narrow(dim, lo, size) for k, dim in zip(live, dims, strict=True)]  # type: ignore[union-attr]
        try:
            # sdpa's fused kernels have no batching rule (vmap would loop over samples); the math one decomposes
            with sdpa_kernel([SDPBackend.MATH]):
                grads = per_sample(params, x, d)
        except RuntimeError as exc:
            if "randomness" not in str(exc):
                raise
            raise ConfigError(
                "record.grad_moments: a module draws random numbers (dropout) in train mode, and its per-sample "
                "gradients cannot replay them; use record.grad_moments.source = 'probe' (eval mode)"
            ) from None
        for name, g in grads.items():
            acc[name] = add_stats(acc.get(name), stats_of(g, signs))
    return acc


@contextlib.contextmanager
def hooks_off(modules: Iterable[nn.Module]) -> Iterator[None]:
    """No hook of these modules fires for the duration (a rerun must not feed other probes' hooks).

    torch has no switch for this; the per-module hook dicts are swapped for empty ones and restored.
    """
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    saved = [(m, kind, getattr(m, kind)) for m in modules for kind in kinds]
    for m, kind, hooks in saved:
        setattr(m, kind, type(hooks)())
    try:
        yield
    finally:
        for m, kind, hooks in saved:
            setattr(m, kind, hooks)


def _replays_badly(module: nn.Module) -> str | None:
    """A module below `module` whose train-mode forward a per-sample rerun cannot reproduce."""
    for name, m in module.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p):
            return name or type(m).__name__
        if isinstance(m, nn.MultiheadAttention) and m.dropout:
            return name or type(m).__name__
    return None


def moments(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    delta: Sequence[torch.Tensor | None],
    names: Sequence[str],
    batch: int,
    signs: bool = True,
    out_dims: Sequence[int] | None = None,
) -> dict[str, Stats]:
    """Moments of the parameters `names` (relative to `module`) from one call of `module`.

    `delta` holds the gradients of the call's output leaves (None where there is none), whose
    batch dims are `out_dims` (default all 0). Input tensors of size `batch` in the first output's
    batch dim are per sample (split along it; a sequence-first call keeps its layout); other inputs
    are shared by all samples.
    """
    if len(list(module.children())) and (child := _replays_badly(module)) is not None:
        raise ConfigError(
            f"record.grad_moments: per-sample moments of {', '.join(names)} rerun {type(module).__name__}'s call, "
            f"which cannot replay {child} (dropout or batch statistics) in train mode; use "
            "record.grad_moments.source = 'probe' (eval mode) or register these parameters on a module without children"
        )
    wanted = set(names)
    all_params = dict(module.named_parameters())
    params = {n: all_params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in all_params.items() if n not in wanted}
    buffers = dict(module.named_buffers())
    leaves, spec = tree_flatten((args, kwargs))
    dims = list(out_dims) if out_dims is not None else [0] * len(delta)
    at = dims[0]
    in_dims = [at if isinstance(t, torch.Tensor) and t.dim() > at and t.shape[at] == batch else None for t in leaves]

    def call(p: dict[str, torch.Tensor], x: list[Any]) -> Any:
        # each sample as a batch of one: the module's code may read x.shape[0] or need a batch dim
        one = [t.unsqueeze(dim) if dim is not None else t for t, dim in zip(x, in_dims, strict=True)]
        a, kw = tree_unflatten(one, spec)
        with hooks_off(module.modules()):
            return functional_call(module, (p, fixed, buffers), tuple(a), kw)

    return vmap_moments(call, params, leaves, in_dims, delta, dims, signs)
