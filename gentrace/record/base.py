"""What a probe is and what it sees.

A probe turns training state into rows of one or more store streams. The recorder calls every
probe after each optimizer step (`after_step`, with the batch's loss already on the host) and at
every step where a probe may record (`at_step`, step 0 being the initialization); probes check
their own schedules. Probes hand the writer host NumPy arrays only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gentrace.core.config import RunConfig
from gentrace.core.schedules import Timeline
from gentrace.store.schema import StreamSpec
from gentrace.store.writer import RowBlock
from gentrace.task.data import Dataset
from gentrace.task.losses import LossName
from gentrace.training.distributed import Dist


@dataclass
class RunContext:
    """Everything fixed for the whole run that probes may read.

    Attributes:
        cfg: the resolved config.
        data: the data set; x_train [M, n, ...] already on `device`.
        models: the M replicate models (same initialization).
        loss: the resolved loss name.
        timeline: the step grid.
        device: where the models live.
        checkpoint: serializes model, optimizer, RNG and probe state (for resume) when called.
        dist: this process's rank among the processes of a torchrun launch (Dist() when alone);
            probes split their passes with it and combine the pieces (gentrace.training.distributed).
        sample_weight: under torchrun, the weight world / B that each sample's loss carries in the
            current training step's backward; None when alone (the backward is of the batch mean).
    """

    cfg: RunConfig
    data: Dataset
    models: list[nn.Module]
    loss: LossName
    timeline: Timeline
    device: torch.device
    checkpoint: Callable[[], bytes]
    dist: Dist = field(default_factory=Dist)
    sample_weight: float | None = None


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step's host-side summary: lr used, batch_loss [M], batch_error [M] (batch means)."""

    step: int
    epoch: int
    lr: float
    batch_loss: np.ndarray
    batch_error: np.ndarray
    batch_size: int = 0


class Probe:
    """Base class: subclasses declare streams and yield RowBlocks; the defaults record nothing."""

    name = "probe"

    # Rows a probe may hold in memory before handing them over as one block (each zarr call
    # costs ~1-5 ms of fixed overhead, so small rows are written in batches).
    buffer_limit = 1

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.next_row: dict[str, int] = {}
        self._buffers: dict[str, list[dict[str, np.ndarray]]] = {}

    def streams(self) -> list[StreamSpec]:
        """The streams this probe writes, preallocated at their final row counts."""
        return []

    def static(self) -> dict[str, np.ndarray]:
        """Arrays written once into `data/` when the store is created (e.g. the probe set's indices)."""
        return {}

    def install(self) -> list[RemovableHandle]:
        """Register the module hooks this probe needs; the recorder removes them all on exit."""
        return []

    def after_step(self, info: StepInfo) -> Iterable[RowBlock]:
        """Called after every optimizer step."""
        return ()

    def at_step(self, step: int, epoch: int) -> Iterable[RowBlock]:
        """Called at step 0 and after every optimizer step, after `after_step` of every probe."""
        return ()

    def state(self) -> dict[str, Any] | None:
        """State a resumed run needs beyond the model and optimizer (saved in every checkpoint)."""
        return None

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` returned."""

    def wants_input_grad(self, step: int) -> bool:
        """Whether the training step that will become `step` should keep the input gradient."""
        return False

    def before_backward(self, step: int, x: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """Inside a training step, after the forward pass (the graph is still whole)."""

    def after_backward(self, step: int, x: torch.Tensor, outputs: list[torch.Tensor], y: torch.Tensor) -> None:
        """Inside a training step, after the backward pass and before the parameter update."""

    def checkpoint_due(self, step: int) -> bool:
        """Whether this probe writes a resume checkpoint at `step` (the recorder flushes every buffer first)."""
        return False

    def emit(self, stream: str, row: dict[str, np.ndarray]) -> Iterable[RowBlock]:
        """Buffer one row (each array [1, *row_shape]); yields a block once `buffer_limit` rows wait."""
        buffer = self._buffers.setdefault(stream, [])
        buffer.append(row)
        if len(buffer) >= self.buffer_limit:
            yield from self._flush_stream(stream)

    def flush(self) -> Iterable[RowBlock]:
        """Hand over rows buffered in memory (called before a checkpoint row and at the end)."""
        for stream in list(self._buffers):
            yield from self._flush_stream(stream)

    def _flush_stream(self, stream: str) -> Iterable[RowBlock]:
        rows = self._buffers.pop(stream, [])
        if rows:
            arrays = {path: np.concatenate([r[path] for r in rows]) for path in rows[0]}
            yield RowBlock(stream, self.take_row(stream, len(rows)), arrays)

    def resume(self, rows: dict[str, int]) -> None:
        """Continue writing after `rows[stream]` kept rows of each stream."""
        self.next_row.update({s.name: rows.get(s.name, 0) for s in self.streams()})

    def take_row(self, stream: str, count: int = 1) -> int:
        """Reserve `count` rows of `stream` and return the first one's index."""
        start = self.next_row.get(stream, 0)
        self.next_row[stream] = start + count
        return start


def host(tensors: Iterable[torch.Tensor]) -> np.ndarray:
    """Stack replicate tensors into one host float32 array [M, *shape] (a copy, safe to queue)."""
    return torch.stack([t.detach() for t in tensors]).to("cpu", torch.float32).numpy()
