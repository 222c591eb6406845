"""The Recorder: builds the probes a [record] table asks for and feeds their rows to the store writer.

Any training loop drives it through the interface of gentrace.record.base: a RunContext, a
Checkpointer, and the calls at_step / before_backward / after_backward / after_step. Adding a probe =
one module under `record/` + one entry in PROBES. Order matters for crash safety: the `params` probe
(which carries the resume checkpoint) runs last at a step, after every buffered row has been handed
over, so a committed checkpoint never precedes a row of its own step or earlier.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Protocol

import numpy as np
from torch.utils.hooks import RemovableHandle

from gentrace.core.schedules import Timeline
from gentrace.record.activations import activations_probe
from gentrace.record.base import Batch, Checkpointed, Checkpointer, Emitted, Probe, RunContext, StepInfo
from gentrace.record.evaluator import Evaluator
from gentrace.record.grad_moments import grad_moments_probe
from gentrace.record.lipschitz_fine import lipschitz_fine_probe
from gentrace.record.metrics import MetricsProbe
from gentrace.record.metrics_fine import MetricsFineProbe
from gentrace.record.params import params_fine_probe, params_probe
from gentrace.record.predictions import PredictionsProbe
from gentrace.store import schema
from gentrace.store.schema import StreamSpec
from gentrace.store.writer import RowBlock

ProbeFactory = Callable[[RunContext, Evaluator], Probe | None]

# stream -> factory (None when the config turns the stream off); the checkpointing probe comes last.
PROBES: dict[str, ProbeFactory] = {
    schema.METRICS_FINE.name: lambda ctx, ev: MetricsFineProbe(ctx),
    schema.METRICS.name: lambda ctx, ev: MetricsProbe(ctx, ev),
    schema.PREDS.name: lambda ctx, ev: PredictionsProbe(ctx, ev) if PredictionsProbe.wanted(ctx) else None,
    schema.GRAD.name: lambda ctx, ev: grad_moments_probe(ctx),
    schema.LIPSCHITZ_FINE.name: lambda ctx, ev: lipschitz_fine_probe(ctx),
    schema.ACTS.name: lambda ctx, ev: activations_probe(ctx),
    schema.PARAMS_FINE.name: lambda ctx, ev: params_fine_probe(ctx),
    schema.PARAMS.name: lambda ctx, ev: params_probe(ctx),
}


class RowSink(Protocol):
    """Where a Recorder hands its rows: the store writer, or a DiscardSink (`gentrace check`)."""

    def start(self) -> None:
        """Called once by Recorder.attach, before the first row."""

    def put(self, block: RowBlock) -> None:
        """Take one block of rows."""


class DiscardSink:
    """A RowSink that keeps no row, only counts them: drives the probes of rank 0 without a store (`gentrace check`).

    Attributes:
        rows: stream -> rows handed over.
        nbytes: stream -> bytes of those rows' arrays (uncompressed).
        checkpoints: resume checkpoints handed over (with `params` rows), and their bytes in `checkpoint_bytes`.
    """

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        self.checkpoints = 0
        self.checkpoint_bytes = 0

    def start(self) -> None:
        """Nothing to start."""

    def put(self, block: RowBlock) -> None:
        """Count the block's rows and bytes, then drop it."""
        self.rows[block.stream] = self.rows.get(block.stream, 0) + block.rows
        size = sum(int(values.nbytes) for values in block.arrays.values())
        self.nbytes[block.stream] = self.nbytes.get(block.stream, 0) + size
        if block.checkpoint is not None:
            self.checkpoints += 1
            self.checkpoint_bytes += len(block.checkpoint)


class Recorder:
    """Context manager around one training run: probes in, RowBlocks out to the writer.

    `checkpointer` serializes the loop's training state for the resume checkpoints that the `params`
    probe's rows carry (None: a loop that takes no checkpoints; then `params` rows carry none).
    """

    def __init__(self, ctx: RunContext, checkpointer: Checkpointer | None = None) -> None:
        self.ctx = ctx
        self.checkpointer = checkpointer
        evaluator = Evaluator(ctx)
        built = ((name, factory(ctx, evaluator)) for name, factory in PROBES.items())
        self.probes: list[Probe] = [probe for _, probe in built if probe is not None]
        self._writer: RowSink | None = None
        self._handles: list[RemovableHandle] = []

    def streams(self) -> list[StreamSpec]:
        """Every stream the probes write, preallocated."""
        return [stream for probe in self.probes for stream in probe.streams()]

    def static(self) -> dict[str, np.ndarray]:
        """The probes' `data/` arrays."""
        return {path: values for probe in self.probes for path, values in probe.static().items()}

    def state(self) -> dict[str, Any]:
        """Probe states for a checkpoint: probe name -> state."""
        states = {probe.name: probe.state() for probe in self.probes}
        return {name: state for name, state in states.items() if state is not None}

    def load_state(self, states: dict[str, Any]) -> None:
        """Restore probe states saved by `state`."""
        for probe in self.probes:
            if probe.name in states:
                probe.load_state(states[probe.name])

    def resume(self, rows: dict[str, int]) -> None:
        """Tell every probe how many rows of its streams are kept."""
        for probe in self.probes:
            probe.resume(rows)

    def extend(self, timeline: Timeline) -> None:
        """The run goes on past its planned steps (gentrace.Run): every probe takes the steps of `timeline`.

        Rows already written stay; the writer grows the arrays as rows arrive past their preallocated length.
        """
        self.ctx.timeline = timeline
        for probe in self.probes:
            probe.steps = probe.schedule()

    def attach(self, writer: RowSink | None) -> Recorder:
        """Send rows to `writer` (started here); None on the ranks other than 0 of torchrun, which drop their rows.

        A DiscardSink instead of a writer records into nothing, on any rank (`gentrace check`).
        """
        self._writer = writer
        if writer is not None:
            writer.start()
        return self

    def __enter__(self) -> Recorder:
        for probe in self.probes:
            self._handles.extend(probe.install())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def after_step(self, info: StepInfo) -> None:
        """After every optimizer step."""
        for probe in self.probes:
            self._put(probe.after_step(info))

    def wants_input_grad(self, step: int) -> bool:
        """Whether any probe needs the input gradient of the training step that becomes `step`."""
        return any(probe.wants_input_grad(step) for probe in self.probes)

    def before_backward(self, batch: Batch) -> None:
        """Inside the training step, after the forward pass."""
        for probe in self.probes:
            probe.before_backward(batch)

    def after_backward(self, batch: Batch) -> None:
        """Inside the training step, after backward, before the update."""
        for probe in self.probes:
            probe.after_backward(batch)

    def at_step(self, step: int, epoch: int) -> None:
        """At step 0 and after every optimizer step; probes check their schedules."""
        for probe in self.probes:
            if probe.checkpoint_due(step):
                self.flush()
            self._put(probe.at_step(step, epoch))

    def syncs_at(self, step: int) -> bool:
        """Whether any probe reads the device back at `step` (a loop checks for divergence first then)."""
        return any(probe.syncs_at(step) for probe in self.probes)

    def drop_from(self, step: int) -> None:
        """Forget every buffered row of steps at or after `step` (the loss diverged there)."""
        for probe in self.probes:
            probe.drop_from(step)

    def flush(self) -> None:
        """Hand every buffered row to the writer."""
        for probe in self.probes:
            self._put(probe.flush())

    def _put(self, blocks: Iterable[Emitted]) -> None:
        for item in blocks:
            block = self._with_checkpoint(item) if isinstance(item, Checkpointed) else item
            if self._writer is not None:
                self._writer.put(block)
            else:
                assert not self.ctx.dist.is_main, "attach a writer (or a DiscardSink) before recording"

    def _with_checkpoint(self, item: Checkpointed) -> RowBlock:
        """The row with the training state of this moment (and every probe's state) as its checkpoint."""
        if self.checkpointer is None:
            return item.block
        payload = self.checkpointer.checkpoint({"probes": self.state()})
        return dataclasses.replace(item.block, checkpoint=payload)
