"""Owners with children (a ViT's class token on the model): their own code rerun, children replaced.

A module M that owns parameters P and calls children (`ownership.owners`) computes, per sample,
out = f(P, x, c_1(u_1), c_2(u_2), ...), where u_k are the inputs its own code hands to the k-th child call
and c_k(u_k) what came back. By the chain rule, sample i's gradient of P is

    g_i = d/dP [ <out_i, delta_i> + sum_k <u_ki, gamma_ki> ]

with delta_i the gradient of the loss at M's output and gamma_ki the gradient that flowed into
the k-th child call's input through that child, both from the real backward pass, and the
children's outputs held at their recorded values. So only M's own operations are rerun (torch.func,
a sample at a time), not the children: cheap, and exact even where the children use dropout or
batch statistics. `Tracker` records the child calls in the forward pass (each tensor input that
needs a gradient is handed over as a fresh view, whose gradient is gamma); `moments` reruns.

Not replayable (NotReplayable; the engine then reruns M whole, `fallback.moments`): a child's
input or output without a single batch-sized dim, a child that modified its input in place, or
a recorded output modified in place afterwards, or a rerun that calls children differently.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from gentrace.moments.accumulator import Stats
from gentrace.moments.fallback import hooks_off, vmap_moments


class NotReplayable(Exception):
    """The recorded child calls cannot stand in for the children in a rerun."""


@dataclass
class ChildCall:
    """One call of a child by its owner's own code, as the forward pass made it.

    Attributes:
        module: the child.
        grads: per input that needs a gradient: (leaf index in the call's (args, kwargs), the view
            handed to the child [*], its batch dim, its version when handed over).
        outs: the output's leaves, tensors detached; out_spec their structure; out_dims their batch dims;
            out_versions their versions when returned.
    """

    module: nn.Module
    grads: list[tuple[int, torch.Tensor, int, int]] = field(default_factory=list)
    outs: list[Any] = field(default_factory=list)
    out_spec: TreeSpec | None = None
    out_dims: list[int | None] = field(default_factory=list)
    out_versions: list[int] = field(default_factory=list)


@dataclass
class Frame:
    """The child calls of one call of an owner with children; `ok` False: not replayable."""

    calls: list[ChildCall] = field(default_factory=list)
    ok: bool = True

    def views(self) -> list[torch.Tensor]:
        """The views handed to the children, in call order (their gradients are the gammas)."""
        return [view for call in self.calls for _, view, _, _ in call.grads]

    def replayable(self) -> bool:
        """Nothing recorded has been modified in place since."""
        if not self.ok:
            return False
        for call in self.calls:
            if any(view._version != version for _, view, _, version in call.grads):
                return False
            tensors = [t for t in call.outs if isinstance(t, torch.Tensor)]
            if any(t._version != v for t, v in zip(tensors, call.out_versions, strict=True)):
                return False
        return True


def batch_dim(t: torch.Tensor, batch: int) -> int | None:
    """The dim of t that indexes samples: the only one of size `batch` (any of size 1 when batch is 1)."""
    dims = [d for d, size in enumerate(t.shape) if size == batch]
    return dims[0] if dims and (batch == 1 or len(dims) == 1) else None


class Tracker:
    """Keeps the stack of running modules below the owners with children and records their child calls."""

    def __init__(
        self, owners: Sequence[nn.Module], active: Callable[[], bool], batch: Callable[[], int | None]
    ) -> None:
        self.owners = {id(m) for m in owners}
        self.modules = list({id(m): m for owner in owners for m in owner.modules()}.values())
        self.active, self.batch = active, batch
        # (module, its call as a child of an owner, that owner's frame), innermost last
        self.stack: list[tuple[nn.Module, ChildCall | None, Frame | None]] = []
        self.open: dict[int, Frame] = {}

    def install(self) -> list[Any]:
        """Hooks on every module below an owner with children; remove the returned handles to uninstall."""
        handles = []
        for m in self.modules:
            handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            handles.append(m.register_forward_hook(self._post, always_call=True))
        return handles

    def reset(self) -> None:
        """A new forward pass of the model (also clears what an exception left behind)."""
        self.stack.clear()
        self.open.clear()

    def close(self, owner: nn.Module) -> Frame | None:
        """The child calls of the owner call that just returned."""
        return self.open.pop(id(owner), None)

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.active() or not torch.is_grad_enabled():
            return None
        caller = self.stack[-1][0] if self.stack else None
        if id(module) in self.owners:
            self.open[id(module)] = Frame()
        frame = self.open.get(id(caller)) if caller is not None else None
        if frame is None:
            self.stack.append((module, None, None))
            return None
        batch = self.batch()
        call = ChildCall(module)
        leaves, spec = tree_flatten((args, kwargs))
        views: dict[int, torch.Tensor] = {}
        for k, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor) or not t.requires_grad:
                continue
            if id(t) in views:  # one tensor passed twice: one view, one gradient
                leaves[k] = views[id(t)]
                continue
            view = views[id(t)] = leaves[k] = t.view_as(t)
            dim = None if batch is None else batch_dim(view, batch)
            if dim is None:
                frame.ok = False
                dim = 0
            call.grads.append((k, view, dim, view._version))
        frame.calls.append(call)
        self.stack.append((module, call, frame))
        return tree_unflatten(leaves, spec) if views else None

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self.stack or self.stack[-1][0] is not module:
            return
        _, call, frame = self.stack.pop()
        if call is None or frame is None:
            return
        batch = self.batch()
        leaves, call.out_spec = tree_flatten(output)
        for t in leaves:
            if isinstance(t, torch.Tensor):
                dim = None if batch is None else batch_dim(t, batch)
                call.outs.append(t.detach())
                call.out_dims.append(dim)
                call.out_versions.append(t._version)
                if dim is None:
                    frame.ok = False
            else:
                call.outs.append(t)
                call.out_dims.append(None)


@contextlib.contextmanager
def _stubs(forwards: dict[int, tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Replace each child's forward by a stub for the duration (an instance attribute shadows the method)."""
    saved = {key: m.__dict__.get("forward") for key, (m, _) in forwards.items()}
    for m, stub in forwards.values():
        m.forward = stub
    try:
        yield
    finally:
        for key, (m, _) in forwards.items():
            before = saved[key]
            if before is None:
                del m.forward
            else:
                m.forward = before


def moments(
    module: nn.Module,
    names: Sequence[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    frame: Frame,
    delta: Sequence[torch.Tensor | None],
    gammas: Sequence[torch.Tensor | None],
    batch: int,
    signs: bool = True,
) -> dict[str, Stats]:
    """Moments of the parameters `names` of `module` by rerunning its own code with its child calls replaced.

    Args:
        module: the owner.
        names: its own parameters (relative names) to differentiate.
        args: its call's positional inputs (a tensor whose first dim is `batch` is per sample).
        kwargs: its call's keyword inputs (likewise).
        frame: its child calls (`Tracker`).
        delta: gradients of its output leaves (batch dim 0, None where there is none).
        gammas: gradients of `frame.views()`, in order (None where there is none).
        batch: samples in the call.
        signs: False: sums only.

    Raises:
        NotReplayable: the rerun did not make the recorded child calls.
    """
    # only the own parameters are swapped in: the children never run (their stubs return what they returned)
    params = {n: module.get_parameter(n).detach() for n in names}
    leaves, spec = tree_flatten((args, kwargs))
    dims: list[int | None] = [
        0 if isinstance(t, torch.Tensor) and t.dim() and len(t) == batch else None for t in leaves
    ]
    n_in = len(leaves)
    for call in frame.calls:  # the recorded outputs, split per sample like the inputs
        for t, dim in zip(call.outs, call.out_dims, strict=True):
            if isinstance(t, torch.Tensor):
                leaves.append(t)
                dims.append(dim)
    # per call, per input needing a gradient: (leaf index, batch dim, shape of one sample's), and where its gamma is
    shapes: list[list[tuple[int, int, tuple[int, ...]]]] = [
        [(k, dim, (*view.shape[:dim], 1, *view.shape[dim + 1 :])) for k, view, dim, _ in call.grads]
        for call in frame.calls
    ]
    starts = [sum(len(g) for g in shapes[:c]) for c in range(len(shapes))]
    n_views = sum(len(g) for g in shapes)

    def run(p: dict[str, torch.Tensor], x: list[Any]) -> Any:
        one = [t.unsqueeze(0) if dim is not None else t for t, dim in zip(x[:n_in], dims[:n_in], strict=True)]
        a, kw = tree_unflatten(one, spec)
        saved = iter(zip(x[n_in:], dims[n_in:], strict=True))
        queues: dict[int, deque[tuple[int, Any]]] = {}
        for c, call in enumerate(frame.calls):
            outs = []
            for t in call.outs:
                if isinstance(t, torch.Tensor):
                    value, dim = next(saved)
                    # a copy: the owner's code may modify a child's output in place (`out += identity`)
                    outs.append((value if dim is None else value.unsqueeze(dim)).clone())
                else:
                    outs.append(t)
            assert call.out_spec is not None
            queues.setdefault(id(call.module), deque()).append((c, tree_unflatten(outs, call.out_spec)))
        views: list[torch.Tensor | None] = [None] * n_views

        def stub_for(key: int) -> Callable[..., Any]:
            def forward(*c_args: Any, **c_kwargs: Any) -> Any:
                if not queues[key]:
                    raise NotReplayable
                c, out = queues[key].popleft()
                given = tree_flatten((c_args, c_kwargs))[0]
                for j, (k, _, shape) in enumerate(shapes[c]):
                    u = given[k] if k < len(given) else None
                    if not isinstance(u, torch.Tensor) or tuple(u.shape) != shape:
                        raise NotReplayable
                    views[starts[c] + j] = u
                return out

            return forward

        children = {id(call.module): (call.module, stub_for(id(call.module))) for call in frame.calls}
        with _stubs(children), hooks_off([module, *(m for m, _ in children.values())]):
            out = functional_call(module, p, tuple(a), kw)
        if any(queues.values()) or any(v is None for v in views):
            raise NotReplayable
        return out, views

    deltas = [*delta, *gammas]
    delta_dims = [0] * len(delta) + [dim for per_call in shapes for _, dim, _ in per_call]
    if all(d is None for d in deltas):
        return {}
    return vmap_moments(run, params, leaves, dims, deltas, delta_dims, signs)
