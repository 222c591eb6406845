"""Probes `params` and `params_fine`: snapshots of parameter tensors of every replicate.

`params` (all tensors or the named ones, every N epochs, step 0 = initialization) also carries
the training-state checkpoint that `record --resume` restarts from: the writer puts it on disk
before committing the row, so every committed snapshot can be resumed from. `params_fine` keeps
a few tensors (default: the first layer's bias) every N optimizer steps, cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from gentrace.models import resolve_names
from gentrace.record.base import Probe, RunContext, host
from gentrace.schedules import every_epochs, every_steps
from gentrace.store import schema
from gentrace.store.writer import RowBlock


class TensorSnapshotProbe(Probe):
    """Writes `<stream>/<tensor> [S, M, *shape]` float32 and `<stream>/step`, `<stream>/epoch` [S]."""

    def __init__(
        self, ctx: RunContext, stream: str, names: Sequence[str], steps: Sequence[int], checkpoints: bool
    ) -> None:
        super().__init__(ctx)
        self.name = stream
        self.names = list(names)
        self.steps = set(steps)
        self.checkpoints = checkpoints
        params = dict(ctx.models[0].named_parameters())
        self.shapes = {name: tuple(params[name].shape) for name in self.names}

    def streams(self) -> list[schema.StreamSpec]:
        """One stream, one row per snapshot step."""
        return [schema.tensor_stream(self.name, len(self.steps), len(self.ctx.models), self.shapes)]

    def at_step(self, step: int, epoch: int) -> Iterable[RowBlock]:
        """Copy the tensors of every replicate to the host (and the checkpoint, for `params`)."""
        if step not in self.steps:
            return
        per_model = [dict(model.named_parameters()) for model in self.ctx.models]
        row = {
            f"{self.name}/step": np.array([step], np.int64),
            f"{self.name}/epoch": np.array([epoch], np.int32),
        }
        for name in self.names:
            row[f"{self.name}/{name}"] = host(p[name] for p in per_model)[None]
        checkpoint = self.ctx.checkpoint() if self.checkpoints else None
        yield RowBlock(self.name, self.take_row(self.name), row, checkpoint=checkpoint, checkpoint_step=step)


def params_probe(ctx: RunContext) -> TensorSnapshotProbe | None:
    """`record.params`: every tensor (or `names`) every N epochs, with resume checkpoints."""
    rec = ctx.cfg.record.params
    if rec.every_epochs == 0:
        return None
    names = resolve_names(ctx.models[0], rec.names, "record.params.names")
    return TensorSnapshotProbe(ctx, "params", names, every_epochs(rec.every_epochs, ctx.timeline), checkpoints=True)


def params_fine_probe(ctx: RunContext) -> TensorSnapshotProbe | None:
    """`record.params_fine`: a few tensors every N optimizer steps."""
    rec = ctx.cfg.record.params_fine
    if rec.every_steps == 0 or not rec.names:
        return None
    names = resolve_names(ctx.models[0], rec.names, "record.params_fine.names")
    steps = every_steps(rec.every_steps, ctx.timeline)
    return TensorSnapshotProbe(ctx, "params_fine", names, steps, checkpoints=False)
