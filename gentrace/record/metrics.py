"""Probe `metrics`: train/test loss and accuracy of every replicate at the eval cadence.

Rows at step 0 and once per epoch (`record.eval_every_steps = 0`) or every N optimizer steps.
Accuracy is NaN for regression runs, which have no classes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from gentrace.core.schedules import eval_steps
from gentrace.record.base import Probe, RunContext, StepInfo
from gentrace.record.evaluator import Evaluator
from gentrace.store import schema
from gentrace.store.writer import RowBlock
from gentrace.task.losses import correct


class MetricsProbe(Probe):
    """Writes `metrics/`: step, epoch, lr [R]; train_loss, train_acc, test_loss, test_acc [R, M]."""

    name = schema.METRICS.name
    buffer_limit = 64

    def __init__(self, ctx: RunContext, evaluator: Evaluator) -> None:
        super().__init__(ctx)
        self.evaluator = evaluator
        self.steps = self.schedule()
        self.lr = ctx.lr

    def schedule(self) -> set[int]:
        """Step 0, then every epoch or every `eval_every_steps` steps."""
        return set(eval_steps(self.ctx.record.eval_every_steps, self.ctx.timeline))

    def streams(self) -> list[schema.StreamSpec]:
        """One `metrics` stream with a row per eval step."""
        return [schema.metrics_stream(len(self.steps), len(self.ctx.models))]

    def after_step(self, info: StepInfo) -> Iterable[RowBlock]:
        """Remember the lr in force, for the next row."""
        self.lr = info.lr
        return ()

    def at_step(self, step: int, epoch: int) -> Iterable[RowBlock]:
        """Evaluate every replicate on its training set and the test set."""
        if step not in self.steps:
            return
        metrics = schema.METRICS
        row: dict[str, np.ndarray] = {
            metrics.step: np.array([step], np.int64),
            metrics.epoch: np.array([epoch], np.int32),
            metrics.lr: np.array([self.lr], np.float64),
        }
        for split in ("train", "test"):
            out, y = self.evaluator.outputs(step, split), self.evaluator.targets(split)
            loss = self.evaluator.losses(step, split).mean(dim=1)
            acc = correct(out.flatten(0, 1), y.flatten(0, 1), self.ctx.loss).view(y.shape).mean(dim=1)
            row[metrics.split_loss(split)] = loss[None].float().cpu().numpy()
            row[metrics.split_acc(split)] = acc[None].float().cpu().numpy()
        yield from self.emit(self.name, row)
