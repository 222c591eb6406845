"""Probe `metrics_fine`: lr, batch_loss and batch_error of every replicate at every optimizer step.

Rows are buffered in memory and handed to the writer in blocks (each zarr call costs a few ms),
every FLUSH_ROWS steps and before every checkpoint row, so a resumed run never lacks a row that
precedes its checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from gentrace.record.base import Probe, RunContext, StepInfo
from gentrace.store import schema
from gentrace.store.writer import RowBlock

FLUSH_ROWS = 512


class MetricsFineProbe(Probe):
    """Writes `metrics_fine/`: step, lr [F]; batch_loss, batch_error [F, M] (F = total optimizer steps)."""

    name = "metrics_fine"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self._buffer: list[StepInfo] = []

    def streams(self) -> list[schema.StreamSpec]:
        """One row per optimizer step."""
        return [schema.metrics_fine_stream(self.ctx.timeline.total_steps, len(self.ctx.models))]

    def after_step(self, info: StepInfo) -> Iterable[RowBlock]:
        """Buffer the step; hand a block over every FLUSH_ROWS steps."""
        self._buffer.append(info)
        if len(self._buffer) >= FLUSH_ROWS:
            yield from self.flush()

    def flush(self) -> Iterable[RowBlock]:
        """Hand the buffered rows over as one block."""
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        block = {
            "metrics_fine/step": np.array([r.step for r in rows], np.int64),
            "metrics_fine/lr": np.array([r.lr for r in rows], np.float64),
            "metrics_fine/batch_loss": np.stack([r.batch_loss for r in rows]).astype(np.float32),
            "metrics_fine/batch_error": np.stack([r.batch_error for r in rows]).astype(np.float32),
        }
        yield RowBlock("metrics_fine", self.take_row("metrics_fine", len(rows)), block)
