"""Which module owns each trainable parameter, and the checks that it is used by that module alone.

The moments of a parameter are computed from one module call: its inputs and its output gradient
(`engine.py`). So each trainable parameter needs exactly one owner, a module whose call contains
every use of it:

- a parameter belongs to the module it is registered on; a module with children that registers
  parameters of its own (a ViT's class token and positional embedding on the model) owns just
  those, and the fallback differentiates its whole call with respect to them;
- below a module in SUBTREE_OWNERS the module owns everything: nn.MultiheadAttention reads
  `out_proj.weight` in F.multi_head_attention_forward without ever calling `out_proj`.

Refused, with a one-line ConfigError: one Parameter reachable under two names (weight tying, or
a module registered twice), checked on construction; and a parameter used inside another module's
call or outside every owner's call (a tied output projection `h @ self.embed.weight.T`), checked
on the autograd graph of the first backward pass (`check_uses`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gentrace.core.errors import ConfigError

# Modules whose moment rule covers every parameter below them (their forward uses children's
# parameters without calling the children).
SUBTREE_OWNERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

FIX = "per-sample moments need each parameter used by one module; untie them or freeze one with model.freeze"


def join(prefix: str, name: str) -> str:
    """Dotted parameter or module name `prefix.name` ('' is the model itself)."""
    return f"{prefix}.{name}" if prefix else name


def refuse_tying(model: nn.Module) -> None:
    """Raise ConfigError if one trainable Parameter is held by two modules (or twice by one).

    A module registered under two names is one owner (hooked once; calling it twice in a forward
    pass is refused by the engine), so its parameters' second names are not tying.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(name)
    for same in names.values():
        holders = set()
        for name in same:
            prefix, _, local = name.rpartition(".")
            holders.add((id(model.get_submodule(prefix)), local))
        if len(holders) > 1:
            raise ConfigError(f"model: parameter {same[0]} is shared with {same[1]} (weight tying); {FIX}")


def owners(model: nn.Module, names: set[str] | None = None) -> dict[str, list[str]]:
    """Module prefix -> the names (relative to that module) of the trainable parameters it owns.

    `names`: only these full parameter names (None: all). Modules owning nothing are left out.
    """
    found: dict[str, list[str]] = {}
    seen: set[int] = set()  # a module registered twice owns its parameters once, under its first name

    def visit(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        whole = isinstance(module, SUBTREE_OWNERS)
        own = [
            n
            for n, p in module.named_parameters(recurse=whole)
            if p.requires_grad and (names is None or join(prefix, n) in names)
        ]
        if own:
            found[prefix] = own
        if not whole:
            for child_name, child in module.named_children():
                visit(join(prefix, child_name), child)

    visit("", model)
    return found


@dataclass
class Call:
    """One owner's call in a forward pass, as autograd nodes.

    Attributes:
        prefix: the owner's name.
        outputs: grad_fn of each output tensor that requires grad.
        inputs: grad_fn of each input tensor: where the call's part of the graph stops.
    """

    prefix: str
    outputs: list[Any]
    inputs: set[Any] = field(default_factory=set)


def _region(call: Call) -> set[Any]:
    """Autograd nodes between a call's outputs and its inputs: the operations its forward ran."""
    seen: set[Any] = set()
    stack = list(call.outputs)
    while stack:
        node = stack.pop()
        if node in seen or node in call.inputs:
            continue
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return seen


def check_uses(roots: Iterable[Any], calls: list[Call], owner_of: dict[int, tuple[str, str]]) -> None:
    """Raise ConfigError if a parameter is used by an operation outside its owner's own call.

    `roots`: grad_fn of the model's outputs; `owner_of`: id(parameter) -> (owner prefix, full name).
    Each operation belongs to the innermost owner call whose region holds it (regions nest like the
    calls do); an operation that reads a parameter (an edge to its AccumulateGrad node) must belong
    to that parameter's owner.
    """
    innermost: dict[Any, str] = {}
    regions = [(i, c, _region(c)) for i, c in enumerate(calls)]
    # largest first; among equal regions (a model returning its last module's output) the outer call,
    # which finished later, first
    for _, call, region in sorted(regions, key=lambda r: (-len(r[2]), -r[0])):
        innermost.update(dict.fromkeys(region, call.prefix))
    seen: set[Any] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for f, _ in node.next_functions:
            if f is None:
                continue
            stack.append(f)
            owner = owner_of.get(id(getattr(f, "variable", None)))
            if owner is not None and innermost.get(node) != owner[0]:
                user = innermost.get(node)
                by = "" if user is None else f", by module {user or 'model'}"
                module = owner[0] or "model"
                raise ConfigError(
                    f"model: parameter {owner[1]} is used outside its module {module}{by} (weight tying); {FIX}"
                )
