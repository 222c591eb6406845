"""Probes `params` and `params_fine`: snapshots of parameter tensors of every replicate.

`params` (all tensors or the named ones, every N epochs, step 0 = initialization) also carries
the training-state checkpoint that `record --resume` restarts from: the writer puts it on disk
before committing the row, so every committed snapshot can be resumed from. `params_fine` keeps
a few tensors (default: the first layer's bias) every N optimizer steps, cheaply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from gentrace.core.schedules import Timeline, every_epochs, every_steps
from gentrace.record.base import Checkpointed, Emitted, Probe, RunContext, host
from gentrace.store import schema
from gentrace.store.writer import RowBlock
from gentrace.task.models import resolve_names


class TensorSnapshotProbe(Probe):
    """Writes `<stream>/<tensor> [S, M, *shape]` float32 and `<stream>/step`, `<stream>/epoch` [S]."""

    def __init__(
        self,
        ctx: RunContext,
        stream: str,
        names: Sequence[str],
        steps: Callable[[Timeline], Sequence[int]],
        checkpoints: bool,
    ) -> None:
        super().__init__(ctx)
        self.name = stream
        self.stream = schema.TENSOR_STREAMS[stream]
        self.names = list(names)
        self._schedule = steps
        self.steps = self.schedule()
        self.checkpoints = checkpoints
        params = dict(ctx.models[0].named_parameters())
        self.shapes = {name: tuple(params[name].shape) for name in self.names}
        # Snapshots that carry a checkpoint are written at once; fine snapshots of a few small
        # tensors are batched into blocks of whole chunks.
        self.stream_spec = schema.tensor_stream(
            self.stream, len(self.steps), len(ctx.models), self.shapes, batched=not checkpoints
        )
        self.buffer_limit = self.stream_spec.arrays[0].rows_per_chunk
        self.rows_on_device = not checkpoints  # fine snapshots: tensors until their block is handed over
        self.checkpoint_every_s = ctx.record.checkpoint_every_s
        self._cache: list[dict[str, torch.Tensor]] | None = None
        self._last_checkpoint = -math.inf

    def schedule(self) -> set[int]:
        """The snapshot steps of the stream's cadence."""
        return set(self._schedule(self.ctx.timeline))

    def streams(self) -> list[schema.StreamSpec]:
        """One stream, one row per snapshot step."""
        return [self.stream_spec]

    def checkpoint_due(self, step: int) -> bool:
        """The last snapshot, and any snapshot `checkpoint_every_s` after the previous checkpoint (0: every one).

        With `checkpoint_every_s` > 0 the run's start is its first checkpoint: a snapshot at step 0
        carries none, because the state at step 0 is the config's (its seeds), and a resume with no
        checkpoint yet starts over to the same result (gentrace.training.run._resume_point). A
        checkpoint there would cost every store array a chunk file of one row (the writer writes
        each array's pending rows before a checkpoint commits), then a rewrite of that chunk: on a
        short run such as the quick start, 40 % of the writer's time. A first snapshot later than
        step 0 (a resumed run's) carries one.
        """
        if not self.checkpoints or step not in self.steps:
            return False
        if self.checkpoint_every_s <= 0 or step == max(self.steps):
            return True
        return step != 0 and time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s

    def at_step(self, step: int, epoch: int) -> Iterable[Emitted]:
        """Copy the tensors of every replicate to the host (with a checkpoint when one is due); rank 0 only."""
        if step == 0:  # the run's start: `checkpoint_every_s` counts from here
            self._last_checkpoint = time.monotonic()
        if step not in self.steps or not self.ctx.dist.is_main:
            return
        per_model = self._tensors()
        row: dict[str, np.ndarray | torch.Tensor] = {self.stream.step: np.array([step], np.int64)}
        if not self.checkpoints:
            # fine snapshots stay on the training device until their block is handed over (one copy a block)
            for name in self.names:
                row[self.stream.tensor(name)] = torch.stack([p[name].detach() for p in per_model]).to(torch.float32)[
                    None
                ]
            yield from self.emit(self.name, row)
            return
        host_row: dict[str, np.ndarray] = {self.stream.step: np.array([step], np.int64)}
        for name in self.names:
            host_row[self.stream.tensor(name)] = host(p[name] for p in per_model)[None]
        if self.checkpoint_due(step):
            self._last_checkpoint = time.monotonic()
            yield Checkpointed(RowBlock(self.name, self.take_row(self.name), host_row, checkpoint_step=step))
        else:
            yield RowBlock(self.name, self.take_row(self.name), host_row)

    def _tensors(self) -> list[dict[str, torch.Tensor]]:
        """Each replicate's recorded tensors by name, looked up once.

        Walking named_parameters() every step cost ~0.3 ms, half a quick-start step; loading a state dict
        copies into the same tensors, so the lookup stays valid.
        """
        if self._cache is None:
            self._cache = [{n: p for n, p in model.named_parameters() if n in self.shapes} for model in self.ctx.models]
        return self._cache


def params_probe(ctx: RunContext) -> TensorSnapshotProbe | None:
    """`record.params`: every tensor (or `names`) every N epochs, with resume checkpoints."""
    rec = ctx.record.params
    if rec.every_epochs == 0:
        return None
    names = resolve_names(ctx.models[0], rec.names, "record.params.names")
    return TensorSnapshotProbe(
        ctx, schema.PARAMS.name, names, lambda tl: every_epochs(rec.every_epochs, tl), checkpoints=True
    )


def params_fine_probe(ctx: RunContext) -> TensorSnapshotProbe | None:
    """`record.params_fine`: a few tensors every N optimizer steps."""
    rec = ctx.record.params_fine
    if rec.every_steps == 0 or not rec.names:
        return None
    names = resolve_names(ctx.models[0], rec.names, "record.params_fine.names")
    return TensorSnapshotProbe(
        ctx, schema.PARAMS_FINE.name, names, lambda tl: every_steps(rec.every_steps, tl), checkpoints=False
    )
