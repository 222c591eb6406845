"""Probe `acts`: the on/off pattern of every gate call site on a fixed probe set (SPEC sections 3, 4).

The image-functions paper (section 3) treats each image at each epoch as its own linear function,
identified by its activation path: which ReLU units are on. At recorded epochs one forward pass in
eval mode over the probe samples (the first P training samples of replicate 0; the subsets are
random draws, so these are too) records, for every recorded call site, a bitmask packed
little-endian along the units (numpy.packbits(axis=-1, bitorder="little"); a convolutional layer's
units are all of its C x H x W positions). `record.activations.layers` picks the call sites:

- "relu": every call of an nn.ReLU module; the bit is output > 0 (attr `bit`);
- "gates": every call of an nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU or nn.ELU module; the bit is
  input > 0, the side of the gate's kink the unit is on (for ReLU the same bit as output > 0);
- a list of call sites of "gates" (so a ReLU site name of "relu" works too), with input > 0.

A module called several times per forward (torchvision's BasicBlock reuses one ReLU) gets one
layer per call site, `layer1.0.relu@0`, `layer1.0.relu@1`. Only modules are seen: a functional call
(F.relu, torch.relu, x.clamp(min=0), F.gelu) has no module to hook and records nothing. Hooks exist
only during that pass. Under torchrun each rank runs its contiguous piece of the probe set and
rank 0 receives the rows in sample order (gentrace.training.distributed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from gentrace.core.errors import ConfigError
from gentrace.core.schedules import every_epochs
from gentrace.record.base import Probe, RunContext
from gentrace.store import schema
from gentrace.store.writer import RowBlock

PROBE_BATCH = 256
_BIT_WEIGHTS = 2 ** torch.arange(8)  # little bit order: unit 8k + b is bit b of byte k

# the gate modules of `layers = "gates"`, in the order their names are listed in errors
GATES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU)
OUTPUT_BIT, INPUT_BIT = "output > 0", "input > 0"


def pack_bits(on: torch.Tensor) -> torch.Tensor:
    """[B, units] bool -> [B, ceil(units/8)] uint8, equal to np.packbits(on, axis=-1, bitorder="little")."""
    batch, units = on.shape
    padded = torch.zeros(batch, math.ceil(units / 8) * 8, dtype=torch.uint8, device=on.device)
    padded[:, :units] = on
    weights = _BIT_WEIGHTS.to(device=on.device, dtype=torch.uint8)
    return (padded.view(batch, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def gate_type(module: nn.Module, gates: Sequence[type[nn.Module]] = GATES) -> str | None:
    """The name of the gate class `module` is an instance of ("GELU" for a subclass of nn.GELU too), or None."""
    return next((gate.__name__ for gate in gates if isinstance(module, gate)), None)


def call_sites(
    model: nn.Module, x: torch.Tensor, gates: Sequence[type[nn.Module]] = GATES
) -> dict[str, dict[str, Any]]:
    """Name -> {units, shape, module, module_type} of every call of a `gates` module in one forward of x, in call order.

    `shape` is one sample's (C, H, W or features) at the gate; a gate is elementwise, so its input and
    output have it both.
    """
    calls: list[tuple[str, str, tuple[int, ...]]] = []

    def hook(name: str, kind: str) -> Any:
        return lambda module, inputs, output: calls.append((name, kind, tuple(output.shape[1:])))

    handles = [
        m.register_forward_hook(hook(n, kind))
        for n, m in model.named_modules()
        if (kind := gate_type(m, gates)) is not None
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    counts = {name: sum(1 for n, _, _ in calls if n == name) for name, _, _ in calls}
    seen: dict[str, int] = {}
    sites = {}
    for name, kind, shape in calls:
        k = seen.get(name, 0)
        seen[name] = k + 1
        site = f"{name}@{k}" if counts[name] > 1 else name
        sites[site] = {"units": math.prod(shape), "shape": list(shape), "module": name, "module_type": kind}
    return sites


def relu_call_sites(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """`call_sites` of the nn.ReLU modules only (`layers = "relu"`)."""
    return call_sites(model, x, (nn.ReLU,))


def select_sites(
    model: nn.Module, x: torch.Tensor, layers: Literal["relu", "gates"] | Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The call sites `record.activations.layers` names, each with its attrs (those of `call_sites` and `bit`).

    Raises:
        ConfigError: the model has no module of the chosen kind, or a listed site is none of its gate call sites.
    """
    relu = layers == "relu"
    sites = relu_call_sites(model, x) if relu else call_sites(model, x)
    if not sites:
        others = sorted({info["module_type"] for info in call_sites(model, x).values()}) if relu else []
        if others:
            kinds = "/".join(others)
            raise ConfigError(
                f"record.activations: the model has no nn.ReLU module to record, but it has {kinds} modules: "
                'set record.activations.layers = "gates" to record them, or record.activations.every_epochs = 0'
            )
        kinds = "nn.ReLU" if relu else "nn.ReLU/LeakyReLU/GELU/SiLU/ELU"
        raise ConfigError(
            f"record.activations: the model has no {kinds} module to record; set record.activations.every_epochs = 0"
        )
    if not isinstance(layers, str):
        unknown = [layer for layer in layers if layer not in sites]
        if unknown:
            known = ", ".join(list(sites)[:8]) + (", ..." if len(sites) > 8 else "")
            raise ConfigError(f"record.activations.layers: no gate call site {unknown[0]!r}; call sites: {known}")
        sites = {layer: sites[layer] for layer in layers}
    bit = OUTPUT_BIT if relu else INPUT_BIT
    return {site: {**info, "bit": bit} for site, info in sites.items()}


class ActivationsProbe(Probe):
    """Writes `acts/<layer>/bits [A, P, bytes]` (and `values`), `acts/step`, `acts/epoch` [A]."""

    name = schema.ACTS.name

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        rec = ctx.record.activations
        self.steps = self.schedule()
        self.values = rec.values
        self.x = ctx.data.x_train[0][: rec.probe]
        model = ctx.models[0]
        was_training = model.training
        model.eval()
        try:
            self.sites = select_sites(model, self.x[:1], rec.layers)
        finally:
            model.train(was_training)
        # every site of a module that runs several times per forward is named "@k"
        self.multi_call = {info["module"] for site, info in self.sites.items() if "@" in site}
        self.input_bit = rec.layers != "relu"

    def schedule(self) -> set[int]:
        """Every `record.activations.every_epochs` epochs."""
        return set(every_epochs(self.ctx.record.activations.every_epochs, self.ctx.timeline))

    def streams(self) -> list[schema.StreamSpec]:
        """One `acts` stream with a row per recorded epoch."""
        return [schema.acts_stream(len(self.steps), len(self.x), self.sites, self.values)]

    def static(self) -> dict[str, np.ndarray]:
        """`data/probe_index` [P]: positions of the probe samples in replicate 0's training subset."""
        return {schema.DATA.probe_index: np.arange(len(self.x), dtype=np.int64)}

    def at_step(self, step: int, epoch: int) -> Iterable[RowBlock]:
        """One eval-mode pass over the probe set with hooks on every recorded call site."""
        if step not in self.steps:
            return
        bits: dict[str, list[torch.Tensor]] = {site: [] for site in self.sites}
        values: dict[str, list[torch.Tensor]] = {site: [] for site in self.sites}
        calls: dict[str, int] = {}
        current: dict[str, str] = {}  # module -> the site of its running call
        modules = {info["module"] for info in self.sites.values()}

        def before(name: str) -> Any:
            # a pre-hook sees the input before an in-place gate (ReLU(inplace=True)) overwrites it
            def enter(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                k = calls.get(name, 0)
                calls[name] = k + 1
                site = current[name] = f"{name}@{k}" if name in self.multi_call else name
                if self.input_bit and site in self.sites:
                    bits[site].append(pack_bits(inputs[0].detach().flatten(1) > 0))

            return enter

        def after(name: str) -> Any:
            def leave(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                site = current[name]
                if site not in self.sites:
                    return
                flat = output.detach().flatten(1)
                if not self.input_bit:
                    bits[site].append(pack_bits(flat > 0))
                if self.values:
                    values[site].append(flat.to(torch.float16))

            return leave

        model, dist = self.ctx.models[0], self.ctx.dist
        x = self.x[dist.shard(len(self.x))]
        was_training = model.training
        model.eval()
        handles = []
        for n, m in model.named_modules():
            if n in modules:
                handles += [m.register_forward_pre_hook(before(n)), m.register_forward_hook(after(n))]
        try:
            with torch.no_grad():
                for lo in range(0, len(x), PROBE_BATCH):
                    calls.clear()
                    model(x[lo : lo + PROBE_BATCH])
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        row: dict[str, np.ndarray] = {
            schema.ACTS.step: np.array([step], np.int64),
            schema.ACTS.epoch: np.array([epoch], np.int32),
        }
        for site, info in self.sites.items():
            units = info["units"]
            parts = {schema.ACTS.bits(site): (bits[site], math.ceil(units / 8), torch.uint8)}
            if self.values:
                parts[schema.ACTS.values(site)] = (values[site], units, torch.float16)
            for path, (pieces, width, dtype) in parts.items():
                local = torch.cat(pieces) if pieces else self.x.new_zeros((0, width), dtype=dtype)
                whole = dist.gather(local, len(self.x))  # every rank's piece, in sample order
                if dist.is_main:
                    row[path] = whole.cpu().numpy()[None]
        if dist.is_main:
            yield RowBlock(self.name, self.take_row(self.name), row)


def activations_probe(ctx: RunContext) -> ActivationsProbe | None:
    """`record.activations`, or None when every_epochs is 0."""
    return ActivationsProbe(ctx) if ctx.record.activations.every_epochs else None
