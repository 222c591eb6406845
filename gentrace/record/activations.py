"""Probe `acts`: the on/off pattern of every ReLU call site on a fixed probe set (SPEC sections 3, 4).

The image-functions paper (section 3) treats each image at each epoch as its own linear function,
identified by its activation path: which ReLU units are on. At recorded epochs one forward pass in
eval mode over the probe samples (the first P training samples of replicate 0; the subsets are
random draws, so these are too) records, for every call site of an nn.ReLU module, the bitmask
(output > 0) packed little-endian along the units (numpy.packbits(axis=-1, bitorder="little");
a convolutional layer's units are all of its C x H x W positions). A module called several times
per forward (torchvision's BasicBlock reuses one ReLU) gets one layer per call site,
`layer1.0.relu@0`, `layer1.0.relu@1`. Only nn.ReLU modules are seen, not functional relu calls.
Hooks exist only during that pass. Under torchrun each rank runs its contiguous piece of the probe
set and rank 0 receives the rows in sample order (gentrace.training.distributed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

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


def pack_bits(on: torch.Tensor) -> torch.Tensor:
    """[B, units] bool -> [B, ceil(units/8)] uint8, equal to np.packbits(on, axis=-1, bitorder="little")."""
    batch, units = on.shape
    padded = torch.zeros(batch, math.ceil(units / 8) * 8, dtype=torch.uint8, device=on.device)
    padded[:, :units] = on
    weights = _BIT_WEIGHTS.to(device=on.device, dtype=torch.uint8)
    return (padded.view(batch, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def relu_call_sites(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Name -> {units, shape, module} of every nn.ReLU call in one forward pass of x, in call order."""
    calls: list[tuple[str, tuple[int, ...]]] = []

    def hook(name: str) -> Any:
        return lambda module, inputs, output: calls.append((name, tuple(output.shape[1:])))

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    counts = {name: sum(1 for n, _ in calls if n == name) for name, _ in calls}
    seen: dict[str, int] = {}
    sites = {}
    for name, shape in calls:
        k = seen.get(name, 0)
        seen[name] = k + 1
        site = f"{name}@{k}" if counts[name] > 1 else name
        sites[site] = {"units": math.prod(shape), "shape": list(shape), "module": name}
    return sites


class ActivationsProbe(Probe):
    """Writes `acts/<layer>/bits [A, P, bytes]` (and `values`), `acts/step`, `acts/epoch` [A]."""

    name = schema.ACTS.name

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        rec = ctx.record.activations
        self.steps = set(every_epochs(rec.every_epochs, ctx.timeline))
        self.values = rec.values
        self.x = ctx.data.x_train[0][: rec.probe]
        model = ctx.models[0]
        was_training = model.training
        model.eval()
        sites = relu_call_sites(model, self.x[:1])
        model.train(was_training)
        self.multi_call = {info["module"] for site, info in sites.items() if "@" in site}
        if rec.layers != "relu":
            unknown = [layer for layer in rec.layers if layer not in sites]
            if unknown:
                known = ", ".join(list(sites)[:8])
                raise ConfigError(f"record.activations.layers: no ReLU call site {unknown[0]!r}; call sites: {known}")
            sites = {layer: sites[layer] for layer in rec.layers}
        if not sites:
            raise ConfigError(
                "record.activations: the model has no nn.ReLU module to record; set record.activations.every_epochs = 0"
            )
        self.sites = sites

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
        modules = {info["module"] for info in self.sites.values()}

        def hook(name: str) -> Any:
            def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                k = calls.get(name, 0)
                calls[name] = k + 1
                site = f"{name}@{k}" if name in self.multi_call else name
                if site not in self.sites:
                    return
                flat = output.detach().flatten(1)
                bits[site].append(pack_bits(flat > 0))
                if self.values:
                    values[site].append(flat.to(torch.float16))

            return record

        model, dist = self.ctx.models[0], self.ctx.dist
        x = self.x[dist.shard(len(self.x))]
        was_training = model.training
        model.eval()
        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n in modules]
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
