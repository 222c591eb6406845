"""Probe `preds`: the predicted class (or real output) of every sample of each split, per replicate."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from gentrace.core.schedules import every_epochs, every_steps
from gentrace.record.base import Probe, RunContext
from gentrace.record.evaluator import Evaluator
from gentrace.store import schema
from gentrace.store.writer import RowBlock
from gentrace.task.losses import predict


class PredictionsProbe(Probe):
    """Writes `preds/<split> [Q, M, n_split]` (int16 class or float32 output) and `preds/step` [Q]."""

    name = schema.PREDS.name
    buffer_limit = 16

    def __init__(self, ctx: RunContext, evaluator: Evaluator) -> None:
        super().__init__(ctx)
        self.evaluator = evaluator
        self.splits = list(ctx.record.predictions.splits)
        self.steps = self.schedule()
        self.regression = ctx.data.num_classes == 0  # regression sets have no classes

    @staticmethod
    def wanted(ctx: RunContext) -> bool:
        """Whether the config records predictions at all."""
        rec = ctx.record.predictions
        return bool(rec.every_epochs or rec.every_steps) and bool(rec.splits)

    def schedule(self) -> set[int]:
        """Every `every_epochs` epochs and every `every_steps` steps."""
        rec, tl = self.ctx.record.predictions, self.ctx.timeline
        return set(every_epochs(rec.every_epochs, tl)) | set(every_steps(rec.every_steps, tl))

    def streams(self) -> list[schema.StreamSpec]:
        """One `preds` stream with a row per recorded epoch."""
        sizes: dict[str, int] = {s: self.evaluator.targets(s).shape[1] for s in self.splits}
        return [schema.preds_stream(len(self.steps), len(self.ctx.models), sizes, self.regression)]

    def at_step(self, step: int, epoch: int) -> Iterable[RowBlock]:
        """Predict every sample of every split with every replicate."""
        if step not in self.steps:
            return
        dtype = np.float32 if self.regression else np.int16
        row: dict[str, np.ndarray] = {schema.PREDS.step: np.array([step], np.int64)}
        for split in self.splits:
            out = self.evaluator.outputs(step, split)
            row[schema.PREDS.split(split)] = predict(out, self.ctx.loss).cpu().numpy().astype(dtype)[None]
        yield from self.emit(self.name, row)
