"""Probe `metrics_fine`: lr, batch_loss and batch_error of every replicate at every optimizer step.

Rows are buffered in memory and handed to the writer in blocks (each zarr call costs a few ms),
every FLUSH_ROWS steps and before every checkpoint row, so a resumed run never lacks a row that
precedes its checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from gentrace.record.base import Probe, StepInfo
from gentrace.store import schema
from gentrace.store.writer import RowBlock

FLUSH_ROWS = 512


class MetricsFineProbe(Probe):
    """Writes `metrics_fine/`: step, lr [F]; batch_loss, batch_error [F, M] (F = total optimizer steps)."""

    name = schema.METRICS_FINE.name
    buffer_limit = FLUSH_ROWS

    def streams(self) -> list[schema.StreamSpec]:
        """One row per optimizer step."""
        return [schema.metrics_fine_stream(self.ctx.timeline.total_steps, len(self.ctx.models))]

    def after_step(self, info: StepInfo) -> Iterable[RowBlock]:
        """Buffer the step; a block goes to the writer every FLUSH_ROWS steps."""
        fine = schema.METRICS_FINE
        return self.emit(
            self.name,
            {
                fine.step: np.array([info.step], np.int64),
                fine.lr: np.array([info.lr], np.float64),
                fine.batch_loss: info.batch_loss[None].astype(np.float32),
                fine.batch_error: info.batch_error[None].astype(np.float32),
            },
        )
