"""The rich progress bar of `gentrace record`, on stderr so stdout stays data only."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gentrace.record.base import StepInfo


class TrainingProgress:
    """Shows epoch, step, batch loss and error, samples/s and ETA; updated at most 10 times a second."""

    def __init__(self, total_steps: int, epochs: int, samples_per_step: int, start_step: int = 0) -> None:
        self.epochs = epochs
        self.samples_per_step = samples_per_step
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("loss {task.fields[loss]}  err {task.fields[err]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task: TaskID = self._progress.add_task(
            "train", total=total_steps, completed=start_step, epoch=0, epochs=epochs, loss="-", err="-", rate="-"
        )
        self._t0 = time.perf_counter()
        self._start = start_step
        self._last = 0.0

    def __enter__(self) -> TrainingProgress:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def on_step(self, info: StepInfo) -> None:
        """Update the bar (cheaply: the text is rebuilt at most every 0.1 s)."""
        now = time.perf_counter()
        if now - self._last < 0.1:
            self._progress.update(self._task, completed=info.step)
            return
        self._last = now
        rate = (info.step - self._start) * self.samples_per_step / max(now - self._t0, 1e-9)
        self._progress.update(
            self._task,
            completed=info.step,
            epoch=info.epoch + 1,
            loss=f"{float(info.batch_loss.mean()):.4f}",
            err=f"{float(info.batch_error.mean()):.3f}",
            rate=f"{rate:,.0f}",
        )
