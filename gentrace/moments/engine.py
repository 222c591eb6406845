"""Hooks that feed each owner module's inputs and output gradient to its moment routine.

The results are accumulated per parameter (SPEC section 4).

Every trainable parameter has one owner (`ownership.py`): the module it is registered on, or an
nn.MultiheadAttention above it. A forward hook saves an owner call's inputs (keyword arguments
bound to their positions) and registers a hook on its output tensor; in backward that hook
receives delta, the gradient of the loss with respect to the output (for several output tensors,
one multi-grad hook gets them all, None where there is none). With a summed loss delta[i] is
exactly the output gradient of sample i's own loss; with a mean loss over a batch of B samples it
is that divided by B, which `begin(mean_loss=True)` undoes. (A tensor hook, unlike a full module
backward hook, survives torchvision's in-place `out += identity`: it sees the gradient of the
value before the in-place op, which is the same.) The owner's rule in RULES turns inputs and
delta into moments; an owner without one goes to the torch.func fallback, and an owner with
children (a class token on the model) to `composite.py`, which reruns only its own code. An
output's batch dim is dim 0 if that has the batch's size, else the only dim that has it: a
sequence-first call ([T, B, ...], torch's transformer layers by default) is handled unless T == B,
where it is taken for batch-first.

Refused: tied parameters (on construction), a parameter used outside its owner's call (on the
first backward), a module that runs twice in one forward pass (a per-sample gradient would need
the sum over calls before squaring), and an owner run on inputs without the batch dim (its
output shared by all samples). A parameter that gets no gradient has zero moments.

A tensor hook fires in every backward that passes through its tensor, not only the loss's. Code
that backpropagates something else through a hooked forward pass (the predicted-class logits of
`lipschitz_fine`, with the graph retained for the loss backward that follows) does it inside
`not_the_loss()`: the hooks then leave the saved inputs and the moments alone, and the loss
backward still finds them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.hooks import RemovableHandle

from gentrace.core.errors import ConfigError
from gentrace.moments import attention, batchnorm, composite, conv, fallback, layernorm, linear, ownership
from gentrace.moments.accumulator import Moments, Stats, TensorMoments

Rule = Callable[[nn.Module, tuple[Any, ...], Any, bool], dict[str, Stats]]

# module type -> moment routine (module, inputs, delta, signs); anything else that owns parameters goes
# to the torch.func fallback. `inputs` are the positional arguments (keyword ones bound to their
# positions); `delta` is the output gradient, or for a module returning several tensors a tuple of
# one gradient (or None) per leaf of its output. The cheap rules compute sign counts regardless of `signs`.
RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: lambda m, inputs, d, signs: linear.moments(m, inputs[0], d, signs),
    nn.Conv2d: lambda m, inputs, d, signs: conv.moments(m, inputs[0], d, signs),
    nn.BatchNorm1d: lambda m, inputs, d, signs: batchnorm.moments(m, inputs, d),
    nn.BatchNorm2d: lambda m, inputs, d, signs: batchnorm.moments(m, inputs, d),
    nn.BatchNorm3d: lambda m, inputs, d, signs: batchnorm.moments(m, inputs, d),
    nn.SyncBatchNorm: lambda m, inputs, d, signs: batchnorm.moments(m, inputs, d),  # multi-GPU runs
    nn.LayerNorm: lambda m, inputs, d, signs: layernorm.moments(m, inputs[0], d, signs),
    nn.MultiheadAttention: lambda m, inputs, d, signs: attention.moments(m, inputs, d, signs),
}


# > 0 while a backward that is not the loss's runs (`not_the_loss`): every engine's tensor hooks stay out.
# Module-level, not thread-local: on GPUs the autograd engine runs the hooks on its own device threads.
_not_the_loss = 0


@contextlib.contextmanager
def not_the_loss() -> Iterator[None]:
    """Backward passes run inside are not of the loss: the moment hooks they pass through do nothing."""
    global _not_the_loss
    _not_the_loss += 1
    try:
        yield
    finally:
        _not_the_loss -= 1


def rule_for(module: nn.Module) -> Rule | None:
    """The moment routine for a module, None for the fallback (exact type match: subclasses get the fallback)."""
    if type(module) is nn.Conv2d and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
        return None
    if type(module) is not nn.MultiheadAttention and any(True for _ in module.children()):
        return None  # a module with children that owns parameters of its own: rerun by the fallback
    return RULES.get(type(module))


def _bind(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Keyword arguments that have a position moved into `args`, so a rule sees one tuple."""
    if not kwargs:
        return args, kwargs
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()  # else the arguments after the first one left out stay keywords
    return bound.args, bound.kwargs


# Types pytree always keeps as leaves (None is left out: some torch versions make it an empty node).
_SCALARS = (torch.Tensor, int, float, bool, str)


def _leaves(tree: Any) -> list[Any]:
    """`tree_flatten(tree)[0]`, without pytree's walk for a tensor or a flat tuple (most calls: ~15 a forward)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if type(tree) in (tuple, list) and all(isinstance(x, _SCALARS) for x in tree):
        return list(tree)
    return tree_flatten(tree)[0]


def _detached(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs detached; one tensor passed twice stays one tensor (attention checks `query is key`)."""
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):  # the common call
        return (args[0].detach(),), kwargs
    memo: dict[int, torch.Tensor] = {}

    def detach(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) not in memo:
            memo[id(x)] = x.detach()
        return memo[id(x)]

    return tree_map(detach, args), tree_map(detach, kwargs)


# Rules for position-wise layers, which see a sequence-first call ([T, B, ...]) as batch-first with the dims moved.
POSITIONWISE = (nn.Linear, nn.LayerNorm)


def _batch_dims(module: nn.Module, args: tuple[Any, ...], leaves: list[Any], batch: int) -> list[int] | None:
    """The batch dim of each output leaf; None if an output that needs a gradient has none.

    Dim 0 if it has the batch's size, else the only dim that has (a sequence-first call); 0 for a leaf
    that is no tensor or needs no gradient. None means the output is shared by all samples.
    """
    if isinstance(module, nn.MultiheadAttention):  # attn_output like query, attn_weights batch-first
        query = args[0]
        bdim = 0 if module.batch_first else 1
        return [bdim, 0][: len(leaves)] if query.dim() == 3 and query.shape[bdim] == batch else None
    dims = []
    for t in leaves:
        live = isinstance(t, torch.Tensor) and t.requires_grad
        dim = 0 if not live or (t.dim() and len(t) == batch) else composite.batch_dim(t, batch)
        if dim is None:
            return None
        dims.append(dim)
    return dims


class MomentsEngine:
    """Per-sample gradient moments of every trainable parameter of one model.

    Usage: handles = engine.install(); engine.begin(); <forward + backward>...; m = engine.end().
    Each parameter's owner module (`ownership.owners`) is hooked; tied parameters are refused here,
    and a parameter used outside its owner's call is refused on the first backward pass.
    """

    def __init__(self, model: nn.Module, names: set[str] | None = None, signs: bool = True) -> None:
        ownership.refuse_tying(model)
        self.model = model
        self.owned = ownership.owners(model, names)  # module prefix -> the parameter names it owns
        self.modules: dict[str, nn.Module] = {prefix: model.get_submodule(prefix) for prefix in self.owned}
        self.params = {
            ownership.join(prefix, n): module.get_parameter(n)
            for prefix, module in self.modules.items()
            for n in self.owned[prefix]
        }
        self._owner = {ownership.join(prefix, n): prefix for prefix in self.modules for n in self.owned[prefix]}
        self.signs = signs  # False: sums only (pos and neg stay 0), for measuring what the counts cost
        self.mean_loss = False
        # mean_loss: what undoes the loss's per-sample weight; None = the batch length (a plain mean).
        # Under torchrun a rank's piece of a batch of B carries world / B, so B / world (gentrace.training.distributed).
        self.delta_scale: float | None = None
        self.active = False
        self.moments = Moments()
        self._inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any], list[int]]] = {}  # + output batch dims
        self.outputs: list[torch.Tensor] = []  # this forward pass's hooked outputs, for backward_for_moments
        self._batch: int | None = None  # samples in this forward pass (the model's first tensor input)
        # Until the first backward: the owners' calls and the model's outputs, for ownership.check_uses.
        self._calls: list[ownership.Call] | None = []
        self._roots: list[Any] = []
        # Owners with children: their child calls are recorded, so that only their own code is rerun.
        composites = [m for m in self.modules.values() if rule_for(m) is None and any(True for _ in m.children())]
        self._tracker = composite.Tracker(composites, lambda: self.active, lambda: self._batch)
        self._frames: dict[str, composite.Frame | None] = {}

    def install(self) -> list[RemovableHandle]:
        """Register the forward hooks; remove the returned handles to uninstall."""
        handles = [self.model.register_forward_pre_hook(self._model_pre_hook)]
        handles.append(self.model.register_forward_hook(self._model_hook))
        handles.extend(self._tracker.install())
        for prefix, m in self.modules.items():
            handles.append(m.register_forward_hook(self._forward_hook(prefix), with_kwargs=True))
        return handles

    def begin(self, mean_loss: bool = False, reset: bool = True) -> None:
        """Start accumulating (from zero unless `reset` is False, e.g. after restoring a saved state).

        `mean_loss`: the backward pass is of the batch mean, not the sum, of sample losses.
        """
        self.mean_loss = mean_loss
        self.active = True
        if reset:
            for acc in self.moments.tensors.values():
                acc.zero_()
            self.moments.n, self.moments.loss_sum = 0, 0.0

    def end(self) -> Moments:
        """Stop and return the accumulated moments: valid until the next `begin`, which reuses them.

        A parameter that got no gradient (its module never ran, or did not reach the loss) has
        zero moments: every sample's gradient of it is 0.
        """
        self.active = False
        self._inputs.clear()
        self._frames.clear()
        self._tracker.reset()
        self.outputs = []
        for name, p in self.params.items():
            if name not in self.moments.tensors:
                self.moments.tensors[name] = TensorMoments.zeros(p.shape, p.device)
        return self.moments

    def add_samples(self, n: int, loss_sum: float) -> None:
        """Count samples and their summed loss into the current accumulation."""
        self.moments.n += n
        self.moments.loss_sum += loss_sum

    def _model_pre_hook(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.active:  # (also: the fallback rerunning the whole model per sample)
            return
        first = next((a for a in _leaves(args) if isinstance(a, torch.Tensor) and a.dim()), None)
        self._batch = None if first is None else len(first)
        self._tracker.reset()
        if self._calls is not None:  # a new forward pass: what the check saw of an earlier one is stale
            self._calls, self._roots = [], []

    def _model_hook(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._calls is not None and self.active:
            leaves = _leaves(output)
            self._roots = [t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None]

    def _forward_hook(self, prefix: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            leaves = _leaves(output)
            live = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            if not live:
                return
            if prefix in self._inputs:
                raise RuntimeError(
                    f"module {prefix or type(module).__name__} ran twice in one forward pass; per-sample "
                    "gradient moments of parameters used more than once are not supported"
                )
            args, kwargs = _bind(module, args, kwargs)
            dims = _batch_dims(module, args, leaves, self._batch or len(live[0]))
            if dims is None:
                raise ConfigError(
                    f"model: module {prefix or 'model'} ran on inputs without the batch dim (its output is shared by "
                    "all samples, e.g. an Embedding of positions), so per-sample gradients of its parameters cannot "
                    "be told apart; call it per sample (positions expanded to [batch, T]) or make it an nn.Parameter"
                )
            self._inputs[prefix] = (*_detached(args, kwargs), dims)
            if self._calls is not None:
                ins = [t.grad_fn for t in _leaves((*args, *kwargs.values())) if isinstance(t, torch.Tensor)]
                self._calls.append(ownership.Call(prefix, [t.grad_fn for t in live], {n for n in ins if n}))
            frame = self._tracker.close(module)
            views = frame.views() if frame is not None and frame.ok else []
            if frame is not None:
                self._frames[prefix] = frame if frame.ok else None
            if isinstance(output, torch.Tensor) and not views:
                output.register_hook(lambda grad: self._backward(prefix, module, grad))
            else:  # several tensors: one call once all their gradients are known (None: no gradient)
                where = [k for k, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]

                def on_grads(grads: Any) -> None:
                    delta: list[torch.Tensor | None] = [None] * len(leaves)
                    for k, g in zip(where, grads[: len(where)], strict=True):
                        delta[k] = g
                    self._backward(prefix, module, tuple(delta), tuple(grads[len(where) :]))

                torch.autograd.graph.register_multi_grad_hook([*live, *views], on_grads)
            if not self.mean_loss:
                self.outputs.extend([*live, *views])

        return hook

    def _backward(
        self,
        prefix: str,
        module: nn.Module,
        grad: torch.Tensor | tuple[torch.Tensor | None, ...],
        gammas: tuple[torch.Tensor | None, ...] = (),
    ) -> None:
        """Moments of one owner call from its output gradient(s) (and, for an owner with children, gammas)."""
        if _not_the_loss:
            return
        if self._calls is not None:
            calls, self._calls = self._calls, None  # the graph is complete now; check it once
            owner_of = {id(p): (self._owner[name], name) for name, p in self.params.items()}
            ownership.check_uses(self._roots, calls, owner_of)
            self._roots = []
        args, kwargs, dims = self._inputs.pop(prefix)
        frame = self._frames.pop(prefix, None)
        deltas = grad if isinstance(grad, tuple) else (grad,)
        first = next(d for d in (*deltas, *gammas) if d is not None)
        batch = self._batch or len(first)
        scale = batch if self.delta_scale is None else self.delta_scale

        def scaled(ds: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
            return tuple(None if d is None else d.detach() * scale if self.mean_loss else d.detach() for d in ds)

        delta = scaled(deltas)
        # The fallback runs the module again (torch.func): its own forward hook must stay quiet.
        self.active = False
        try:
            with torch.no_grad():
                rule = rule_for(module)
                names = self.owned[prefix]
                results = None
                if rule is not None:
                    if isinstance(module, POSITIONWISE) and dims[0]:  # sequence-first: batch dim to the front
                        args = (args[0].movedim(dims[0], 0), *args[1:])
                        delta = tuple(None if d is None else d.movedim(dims[0], 0) for d in delta)
                    results = rule(module, args, delta if isinstance(grad, tuple) else delta[0], self.signs)
                elif frame is not None and not any(dims) and frame.replayable():
                    with contextlib.suppress(composite.NotReplayable):
                        results = composite.moments(
                            module, names, args, kwargs, frame, delta, scaled(gammas), batch, self.signs
                        )
                if results is None:
                    results = fallback.moments(module, args, kwargs, delta, names, batch, self.signs, dims)
        finally:
            self.active = True
        for name in self.owned[prefix]:
            stats = results.get(name)
            if stats is None:
                continue
            full = ownership.join(prefix, name)
            acc = self.moments.tensors.get(full)
            if acc is None:
                acc = self.moments.tensors[full] = TensorMoments.zeros(stats[0].shape, stats[0].device)
            acc.add(stats)


def backward_for_moments(engine: MomentsEngine, loss: torch.Tensor) -> None:
    """Backpropagate `loss` so every hooked module sees its output gradient, computing no weight gradient.

    Differentiating with respect to the hooked modules' outputs rather than the parameters skips
    the weight-gradient GEMMs (the moments replace them) and the first layer's input gradient.
    """
    outputs, engine.outputs = engine.outputs, []
    torch.autograd.grad(loss, outputs, allow_unused=True)


def probe_moments(
    engine: MomentsEngine,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 256,
) -> Moments:
    """Moments over the samples x [n, ...], y [n] in batches (the result does not depend on batch_size).

    The engine's hooks must be installed. Each batch uses the summed loss, so delta needs no scaling.
    """
    engine.begin()
    for lo in range(0, len(x), batch_size):
        xb = x[lo : lo + batch_size]
        losses = per_sample_loss(model(xb), y[lo : lo + batch_size])
        engine.add_samples(len(xb), float(losses.detach().sum()))
        backward_for_moments(engine, losses.sum())
    return engine.end()
