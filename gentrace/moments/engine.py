"""Hooks that feed each parameterized module's input and output gradient to its moment routine.

The results are accumulated per parameter (SPEC section 4).

A forward hook saves a module's inputs and registers a hook on its output tensor; in backward
that hook receives delta, the gradient of the loss with respect to the output. With a summed
loss delta[i] is exactly the output gradient of sample i's own loss; with a mean loss over a
batch of B samples it is that divided by B, which `begin(mean_loss=True)` undoes. (A tensor hook, unlike a full module
backward hook, survives torchvision's in-place `out += identity`: it sees the gradient of the
value before the in-place op, which is the same.) Modules that reuse their parameters within one
forward pass (a per-sample gradient would need the sum over calls before squaring) are refused.

A tensor hook fires in every backward that passes through its tensor, not only the loss's. Code
that backpropagates something else through a hooked forward pass (the predicted-class logits of
`lipschitz_fine`, with the graph retained for the loss backward that follows) does it inside
`not_the_loss()`: the hooks then leave the saved inputs and the moments alone, and the loss
backward still finds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gentrace.moments import batchnorm, conv, fallback, linear
from gentrace.moments.accumulator import Moments, Stats, TensorMoments

Rule = Callable[[nn.Module, tuple[Any, ...], torch.Tensor, bool], dict[str, Stats]]

# module type -> moment routine (module, inputs, delta, signs); anything else with parameters goes
# to the torch.func fallback. The cheap rules compute sign counts regardless of `signs`.
RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: lambda m, inputs, d, signs: linear.moments(m, inputs[0], d, signs),
    nn.Conv2d: lambda m, inputs, d, signs: conv.moments(m, inputs[0], d, signs),
    nn.BatchNorm1d: lambda m, inputs, d, signs: batchnorm.moments(m, inputs, d),
    nn.BatchNorm2d: lambda m, inputs, d, signs: batchnorm.moments(m, inputs, d),
    nn.BatchNorm3d: lambda m, inputs, d, signs: batchnorm.moments(m, inputs, d),
    nn.SyncBatchNorm: lambda m, inputs, d, signs: batchnorm.moments(m, inputs, d),  # multi-GPU runs
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


def _fallback(module: nn.Module, inputs: tuple[Any, ...], delta: torch.Tensor, signs: bool) -> dict[str, Stats]:
    return fallback.moments(module, inputs, delta)


def rule_for(module: nn.Module) -> Rule:
    """The moment routine for a module (exact type match, so subclasses get the safe fallback)."""
    rule = RULES.get(type(module))
    if type(module) is nn.Conv2d and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
        return _fallback
    return rule or _fallback


class MomentsEngine:
    """Per-sample gradient moments of every trainable parameter of one model.

    Usage: handles = engine.install(); engine.begin(); <forward + backward>...; m = engine.end().
    """

    def __init__(self, model: nn.Module, names: set[str] | None = None, signs: bool = True) -> None:
        self.modules: dict[str, nn.Module] = {}
        for prefix, module in model.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own and (names is None or any(_join(prefix, n) in names for n in own)):
                self.modules[prefix] = module
        self.names = names
        self.signs = signs  # False: sums only (pos and neg stay 0), for measuring what the counts cost
        self.mean_loss = False
        # mean_loss: what undoes the loss's per-sample weight; None = the batch length (a plain mean).
        # Under torchrun a rank's piece of a batch of B carries world / B, so B / world (gentrace.training.distributed).
        self.delta_scale: float | None = None
        self.active = False
        self.moments = Moments()
        self._inputs: dict[str, tuple[Any, ...]] = {}
        self.outputs: list[torch.Tensor] = []  # this forward pass's hooked outputs, for backward_for_moments

    def install(self) -> list[RemovableHandle]:
        """Register the forward hooks; remove the returned handles to uninstall."""
        return [m.register_forward_hook(self._forward_hook(prefix)) for prefix, m in self.modules.items()]

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
        """Stop and return the accumulated moments: valid until the next `begin`, which reuses them."""
        self.active = False
        self._inputs.clear()
        self.outputs = []
        return self.moments

    def add_samples(self, n: int, loss_sum: float) -> None:
        """Count samples and their summed loss into the current accumulation."""
        self.moments.n += n
        self.moments.loss_sum += loss_sum

    def _forward_hook(self, prefix: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            if prefix in self._inputs:
                raise RuntimeError(
                    f"module {prefix or type(module).__name__} ran twice in one forward pass; per-sample "
                    "gradient moments of parameters used more than once are not supported"
                )
            self._inputs[prefix] = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)
            output.register_hook(self._backward_hook(prefix, module))
            if not self.mean_loss:
                self.outputs.append(output)

        return hook

    def _backward_hook(self, prefix: str, module: nn.Module) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if _not_the_loss:
                return
            inputs = self._inputs.pop(prefix)
            scale = len(grad) if self.delta_scale is None else self.delta_scale
            delta = grad.detach() * scale if self.mean_loss else grad.detach()
            # The fallback runs the module again (torch.func): its own forward hook must stay quiet.
            self.active = False
            try:
                with torch.no_grad():
                    results = rule_for(module)(module, inputs, delta, self.signs)
            finally:
                self.active = True
            for name, stats in results.items():
                full = _join(prefix, name)
                if (self.names is not None and full not in self.names) or not getattr(module, name).requires_grad:
                    continue
                acc = self.moments.tensors.get(full)
                if acc is None:
                    acc = self.moments.tensors[full] = TensorMoments.zeros(stats[0].shape, stats[0].device)
                acc.add(stats)

        return hook


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


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
