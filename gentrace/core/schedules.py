"""When each stream records: step -> bool predicates and the exact list of steps, from the config.

Steps count optimizer updates; step 0 is the initialization and step e * steps_per_epoch the end
of epoch e. Knowing every recorded step in advance lets the writer preallocate each array at its
final length (SPEC section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Timeline:
    """The step grid of a run: `epochs` epochs of `steps_per_epoch` optimizer steps each."""

    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.steps_per_epoch * self.epochs

    def epoch_of(self, step: int) -> int:
        """Completed epochs at `step` (the end of epoch e is step e * steps_per_epoch, epoch e)."""
        return step // self.steps_per_epoch


def timeline(n_train: int, batch_size: int, epochs: int) -> Timeline:
    """Steps per epoch with the last batch kept (batch_size 0 = full batch)."""
    per_batch = n_train if batch_size == 0 else min(batch_size, n_train)
    return Timeline(math.ceil(n_train / per_batch), epochs)


def every_epochs(every: int, tl: Timeline) -> list[int]:
    """Steps at initialization, at the end of every `every`-th epoch and at the end of training (0 = never)."""
    if every == 0:
        return []
    epochs = {0, tl.epochs, *range(every, tl.epochs + 1, every)}
    return sorted(e * tl.steps_per_epoch for e in epochs)


def every_steps(every: int, tl: Timeline) -> list[int]:
    """Steps 0, every, 2*every, ... and the last step (0 = never)."""
    if every == 0:
        return []
    return sorted({0, tl.total_steps, *range(every, tl.total_steps + 1, every)})


def eval_steps(eval_every_steps: int, tl: Timeline) -> list[int]:
    """Steps where train/test metrics are evaluated: once per epoch (0) or every N optimizer steps."""
    return every_epochs(1, tl) if eval_every_steps == 0 else every_steps(eval_every_steps, tl)
