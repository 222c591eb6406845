"""What a probe is and what it sees: the explicit interface between a training loop and the probes.

A probe turns training state into rows of one or more store streams. Any training loop drives the
probes through a Recorder (gentrace.record.recorder) built from a `RunContext` (the models, the data
to evaluate, the loss, the step grid, the [record] table) and a `Checkpointer`; gentrace's own loop
(gentrace.training.loop.Trainer) is one such loop. The loop calls, in this order:

- `at_step(0, 0)` once at the start (step 0 is the initialization);
- per optimizer step: `before_backward(batch)` after the forward pass, `after_backward(batch)` after
  the backward and before the update, `after_step(info)` after the update (the batch's loss on the
  host), then `at_step(step, epoch)`, where probes check their own schedules.

Probes hand the writer host NumPy arrays only. The per-step streams (metrics_fine, params_fine,
lipschitz_fine) keep their rows on the training device and copy them to the host once per block of rows
(`Probe.emit` with tensors, `to_host`): a copy per optimizer step would be a host synchronization per step
on a GPU. `DivergenceWatch` lets a loop find a non-finite loss without reading it back every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gentrace.core.config import RecordConfig
from gentrace.core.errors import TrainingDiverged
from gentrace.core.schedules import Timeline
from gentrace.record.ranks import Dist
from gentrace.store import schema
from gentrace.store.schema import StreamSpec
from gentrace.store.writer import RowBlock
from gentrace.task.data import Dataset
from gentrace.task.losses import LossName, per_sample_loss


@dataclass
class RunContext:
    """Everything fixed for the whole run that probes may read.

    Attributes:
        record: the [record] table of the config (what to record, how often).
        data: the data the probes evaluate: x_train [M, n, ...], y_train [M, n], x_test, y_test, on `device`.
        models: the M replicate models.
        loss: the resolved loss name.
        timeline: the step grid (steps per epoch, epochs, total steps).
        device: where the models live.
        lr: the learning rate at step 0 (later rows take the lr of each step's StepInfo).
        dist: this process's rank among the processes of a torchrun launch (Dist() when alone);
            probes split their passes with it and combine the pieces (gentrace.record.ranks).
        loss_fn: a per-sample loss `(outputs, y) -> [b]` given in code (gentrace.Run); None: the loss
            named by `loss`, which then only says how outputs are read (classes, one logit, values).
    """

    record: RecordConfig
    data: Dataset
    models: list[nn.Module]
    loss: LossName
    timeline: Timeline
    device: torch.device
    lr: float
    dist: Dist = field(default_factory=Dist)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def per_sample_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The loss of each sample alone: (outputs [b, out], y [b]) -> [b]."""
        return self.loss_fn if self.loss_fn is not None else per_sample_loss(self.loss)


class Checkpointer(Protocol):
    """What the loop offers for resume checkpoints: its whole training state, serialized, on demand."""

    def checkpoint(self, extra: dict[str, Any]) -> bytes:
        """Model, optimizer and RNG state at the current step, with `extra` (the probes' states) inside."""
        ...


@dataclass
class Batch:
    """One training step's batch as the probes' hooks see it (between the forward pass and the update).

    Attributes:
        step: the optimizer step this update becomes (1 for the first).
        x: [M, b, *input_shape] inputs, or (gentrace.Run) a list of M inputs [b, *input_shape], one per
            replicate's own forward; they require grad when a probe asked for the input gradient.
        outputs: M tensors [b, out], the forward pass of each replicate (the graph still whole).
        y: [M, b] targets (None before the backward in a user's loop, which hands them over at its step).
        sample_weight: the weight each sample's loss carries in the backward; None means 1 / b (the batch
            mean of one process). Under torchrun each rank backpropagates its piece with weight world / B.
    """

    step: int
    x: torch.Tensor | list[torch.Tensor]
    outputs: list[torch.Tensor]
    y: torch.Tensor | None
    sample_weight: float | None = None

    @property
    def size(self) -> int:
        """b, the samples of each replicate's batch."""
        return int(self.x[0].shape[0]) if isinstance(self.x, list) else int(self.x.shape[1])

    @property
    def leaves(self) -> list[torch.Tensor]:
        """The input tensors autograd differentiates with respect to (one stacked, or one per replicate)."""
        return self.x if isinstance(self.x, list) else [self.x]

    def input_norms(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """Per-sample norms [M, b] of input gradients shaped like `leaves`."""
        assert all(g is not None for g in grads), "the inputs were not differentiated"
        if isinstance(self.x, list):
            return torch.stack([g.flatten(1).norm(dim=1) for g in grads if g is not None])
        assert grads[0] is not None
        return grads[0].flatten(2).norm(dim=2)

    @property
    def per_sample_scale(self) -> float:
        """1 / sample_weight: what a per-sample term of the backward is multiplied by to undo the weighting."""
        return float(self.size) if self.sample_weight is None else 1.0 / self.sample_weight


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step's summary: lr used, batch_loss [M], batch_error [M] (batch means).

    The batch means are tensors on the training device (host arrays are taken too and made tensors):
    reading them on the host is a synchronization, which only the probes' block copies and the progress
    bar's refresh (a few times a second) do.
    """

    step: int
    epoch: int
    lr: float
    batch_loss: torch.Tensor
    batch_error: torch.Tensor
    batch_size: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_loss", "batch_error"):
            value = getattr(self, name)
            if not torch.is_tensor(value):
                object.__setattr__(self, name, torch.as_tensor(np.asarray(value, dtype=np.float32)))


@dataclass(frozen=True)
class Checkpointed:
    """A parameter-snapshot row that carries the resume checkpoint of its step; the Recorder takes it then."""

    block: RowBlock


Emitted = RowBlock | Checkpointed


class Probe:
    """Base class: subclasses declare streams and yield RowBlocks; the defaults record nothing."""

    name = "probe"

    # Rows a probe may hold in memory before handing them over as one block (each zarr call
    # costs ~1-5 ms of fixed overhead, so small rows are written in batches).
    buffer_limit = 1
    # Its rows wait on the training device (tensors) until a block is handed over: its own steps read
    # nothing back, only the block's copy does.
    rows_on_device = False

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.steps: set[int] = set()  # the steps it records at (`schedule`)
        self.next_row: dict[str, int] = {}
        self._buffers: dict[str, list[Mapping[str, np.ndarray | torch.Tensor]]] = {}

    def streams(self) -> list[StreamSpec]:
        """The streams this probe writes, preallocated at their final row counts."""
        return []

    def schedule(self) -> set[int]:
        """The steps this probe records at, from `ctx.timeline` (asked again when a run's timeline grows)."""
        return set()

    def static(self) -> dict[str, np.ndarray]:
        """Arrays written once into `data/` when the store is created (e.g. the probe set's indices)."""
        return {}

    def install(self) -> list[RemovableHandle]:
        """Register the module hooks this probe needs; the recorder removes them all on exit."""
        return []

    def after_step(self, info: StepInfo) -> Iterable[Emitted]:
        """Called after every optimizer step."""
        return ()

    def at_step(self, step: int, epoch: int) -> Iterable[Emitted]:
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

    def before_backward(self, batch: Batch) -> None:
        """Inside a training step, after the forward pass (the graph is still whole)."""

    def after_backward(self, batch: Batch) -> None:
        """Inside a training step, after the backward pass and before the parameter update."""

    def checkpoint_due(self, step: int) -> bool:
        """Whether this probe writes a resume checkpoint at `step` (the recorder flushes every buffer first)."""
        return False

    def emit(self, stream: str, row: Mapping[str, np.ndarray | torch.Tensor]) -> Iterable[RowBlock]:
        """Buffer one row (each array [1, *row_shape]); yields a block once `buffer_limit` rows wait.

        Values may be tensors on the training device: a block's tensors reach the host in one `to_host`.
        """
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
            on_device = [path for path, value in rows[0].items() if torch.is_tensor(value)]
            arrays = {
                path: np.concatenate([np.asarray(r[path]) for r in rows]) for path in rows[0] if path not in on_device
            }
            if on_device:
                blocks = [torch.cat([torch.as_tensor(r[path]) for r in rows]) for path in on_device]
                flat = to_host(torch.cat([b.detach().reshape(-1).to(torch.float32) for b in blocks]), fresh=True)
                offsets = np.cumsum([0, *(b.numel() for b in blocks)])
                for path, block, lo, hi in zip(on_device, blocks, offsets[:-1], offsets[1:], strict=True):
                    arrays[path] = flat[lo:hi].reshape(tuple(block.shape))
            yield RowBlock(stream, self.take_row(stream, len(rows)), arrays)

    def drop_from(self, step: int) -> None:
        """Forget buffered rows of steps at or after `step` (a loss found non-finite there, after the fact)."""
        for stream, rows in self._buffers.items():
            key = schema.step_of(stream)
            self._buffers[stream] = [r for r in rows if key not in r or int(np.asarray(r[key])[0]) < step]

    def syncs_at(self, step: int) -> bool:
        """Whether this probe reads the device back at `step` (its schedule, or a block of rows handed over)."""
        if step in self.steps and not self.rows_on_device:
            return True
        return any(len(rows) + 1 >= self.buffer_limit for rows in self._buffers.values())

    def resume(self, rows: dict[str, int]) -> None:
        """Continue writing after `rows[stream]` kept rows of each stream."""
        self.next_row.update({s.name: rows.get(s.name, 0) for s in self.streams()})

    def take_row(self, stream: str, count: int = 1) -> int:
        """Reserve `count` rows of `stream` and return the first one's index."""
        start = self.next_row.get(stream, 0)
        self.next_row[stream] = start + count
        return start


def to_host(values: torch.Tensor, fresh: bool = False) -> np.ndarray:
    """The probes' one copy from the training device to the host (a new array, safe to queue).

    On a GPU through a pinned host buffer with `non_blocking=True`, then one wait for that copy; every
    device-to-host transfer of recorded data goes through here (the tests count the calls). `fresh`: the
    caller just made `values` (a stack, a cat) and keeps no reference, so on the CPU it is not copied again.
    """
    values = values.detach()
    if fresh and values.device.type == "cpu":
        return values.numpy()
    if values.device.type == "cuda":
        pinned = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        pinned.copy_(values, non_blocking=True)
        torch.cuda.current_stream(values.device).synchronize()
        return pinned.numpy()
    return values.to("cpu", copy=True).numpy()


def host(tensors: Iterable[torch.Tensor]) -> np.ndarray:
    """Stack replicate tensors into one host float32 array [M, *shape] (a copy, safe to queue)."""
    return to_host(torch.stack([t.detach() for t in tensors]).to(torch.float32), fresh=True)


class DivergenceWatch:
    """The first step whose loss is not finite, kept on the training device (no host read per step).

    A loop notes every step's batch losses (`note`, a few device operations) and asks `first()` (one host
    read) before anything is recorded from a step: when a probe is due, a block of rows is handed over,
    or training ends. Rows buffered for steps at or after the divergence are then dropped.
    """

    NONE = 2**62

    def __init__(self, replicates: int, device: torch.device) -> None:
        self._step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self._losses = torch.zeros(replicates, dtype=torch.float32, device=device)

    def note(self, step: int, losses: torch.Tensor) -> None:
        """Remember `step` and its losses [M] if they are the first not all finite."""
        first = (self._step == self.NONE) & ~torch.isfinite(losses).all()
        self._step = torch.where(first, torch.full_like(self._step, step), self._step)
        self._losses = torch.where(first, losses.detach().to(torch.float32), self._losses)

    def first(self) -> tuple[int, np.ndarray] | None:
        """(step, losses [M]) of the first non-finite loss so far, or None (one read back from the device)."""
        values = to_host(torch.cat([self._step.to(torch.float64).reshape(1), self._losses.to(torch.float64)]))
        return None if values[0] >= self.NONE else (int(values[0]), values[1:].astype(np.float32))

    @staticmethod
    def error(found: tuple[int, np.ndarray], unit: str, fix: str) -> TrainingDiverged:
        """The one-line error for `first()`'s answer: the loss value, the step, which `unit` (model), the fix."""
        step, losses = found
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        return TrainingDiverged(f"the loss became {losses[bad]} at step {step} ({unit} {bad}); {fix}")
