"""Probe `metrics_fine`: lr, batch_loss and batch_error of every replicate at every optimizer step.

Rows are buffered (the batch loss and error on the training device, so no step reads them back) and
handed to the writer in blocks, every FLUSH_ROWS steps and before every checkpoint row, so a resumed
run never lacks a row that precedes its checkpoint; a block reaches the host in one copy.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from gentrace.record.base import Probe, StepInfo
from gentrace.store import schema
from gentrace.store.writer import RowBlock

FLUSH_ROWS = 512


class MetricsFineProbe(Probe):
    """Writes `metrics_fine/`: step, lr [F]; batch_loss, batch_error [F, M] (F = total optimizer steps)."""

    name = schema.METRICS_FINE.name
    buffer_limit = FLUSH_ROWS
    rows_on_device = True

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
                fine.batch_loss: info.batch_loss.detach().to(torch.float32)[None],
                fine.batch_error: info.batch_error.detach().to(torch.float32)[None],
            },
        )
