"""Schedules: the step grid and the recorded steps, against a brute-force walk over every step."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from gentrace.core.schedules import Timeline, eval_steps, every_epochs, every_steps, timeline


def brute_steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Count the batches of one epoch, the last partial batch kept (batch_size 0 = full batch)."""
    size = n_train if batch_size == 0 else batch_size
    seen = steps = 0
    while seen < n_train:
        seen += min(size, n_train - seen)
        steps += 1
    return steps


def brute_every_epochs(every: int, steps_per_epoch: int, epochs: int) -> list[int]:
    """Walk every step; keep epoch ends at epoch 0, every `every`-th epoch and the last epoch."""
    if every == 0:
        return []
    kept = []
    for step in range(steps_per_epoch * epochs + 1):
        if step % steps_per_epoch:
            continue
        epoch = step // steps_per_epoch
        if epoch == 0 or epoch % every == 0 or epoch == epochs:
            kept.append(step)
    return kept


def brute_every_steps(every: int, total: int) -> list[int]:
    if every == 0:
        return []
    return [step for step in range(total + 1) if step % every == 0 or step == total]


# (id, n_train, batch_size, epochs, steps per epoch)
TIMELINES = [
    ("full-batch", 100, 0, 3, 1),
    ("exact-batches", 12, 4, 2, 3),
    ("last-partial-batch-kept", 10, 3, 2, 4),
    ("batch-of-1", 5, 1, 1, 5),
    ("batch-larger-than-the-set", 5, 128, 4, 1),
    ("quickstart", 250, 32, 20, 8),
]


@pytest.mark.parametrize(
    ("n_train", "batch_size", "epochs", "per_epoch"), [pytest.param(*c[1:], id=c[0]) for c in TIMELINES]
)
def test_timeline(n_train: int, batch_size: int, epochs: int, per_epoch: int) -> None:
    tl = timeline(n_train, batch_size, epochs)
    assert tl == Timeline(per_epoch, epochs)
    assert tl.total_steps == per_epoch * epochs
    assert [tl.epoch_of(e * per_epoch) for e in range(epochs + 1)] == list(range(epochs + 1))
    assert tl.epoch_of(per_epoch - 1) == 0


# (id, function, every, steps per epoch, epochs, recorded steps)
SCHEDULES = [
    ("epochs-every-1", every_epochs, 1, 4, 3, [0, 4, 8, 12]),
    ("epochs-every-2-keeps-final-odd-epoch", every_epochs, 2, 4, 5, [0, 8, 16, 20]),
    ("epochs-every-longer-than-run", every_epochs, 10, 3, 3, [0, 9]),
    ("epochs-0-is-never", every_epochs, 0, 4, 5, []),
    ("steps-every-3-keeps-last-step", every_steps, 3, 5, 2, [0, 3, 6, 9, 10]),
    ("steps-every-1", every_steps, 1, 2, 2, [0, 1, 2, 3, 4]),
    ("steps-every-longer-than-run", every_steps, 20, 5, 2, [0, 10]),
    ("steps-0-is-never", every_steps, 0, 5, 2, []),
    ("eval-0-is-once-per-epoch", eval_steps, 0, 4, 3, [0, 4, 8, 12]),
    ("eval-every-5-steps", eval_steps, 5, 4, 3, [0, 5, 10, 12]),
]


@pytest.mark.parametrize(
    ("schedule", "every", "per_epoch", "epochs", "expected"), [pytest.param(*c[1:], id=c[0]) for c in SCHEDULES]
)
def test_schedule_examples(
    schedule: Callable[[int, Timeline], list[int]], every: int, per_epoch: int, epochs: int, expected: list[int]
) -> None:
    assert schedule(every, Timeline(per_epoch, epochs)) == expected


GRID = list(itertools.product(range(1, 13), range(14), range(1, 6)))  # n_train, batch_size, epochs


def test_timeline_matches_brute_force() -> None:
    for n_train, batch_size, epochs in GRID:
        tl = timeline(n_train, batch_size, epochs)
        assert tl.steps_per_epoch == brute_steps_per_epoch(n_train, batch_size), (n_train, batch_size)
        assert tl.total_steps == tl.steps_per_epoch * epochs


def test_schedules_match_brute_force() -> None:
    for (n_train, batch_size, epochs), every in itertools.product(GRID, range(7)):
        tl = timeline(n_train, batch_size, epochs)
        where = (n_train, batch_size, epochs, every)
        by_epochs = every_epochs(every, tl)
        assert by_epochs == brute_every_epochs(every, tl.steps_per_epoch, epochs), where
        by_steps = every_steps(every, tl)
        assert by_steps == brute_every_steps(every, tl.total_steps), where
        if every:
            # Both start at the initialization and end at the last step, strictly increasing.
            for steps in (by_epochs, by_steps):
                assert steps[0] == 0, where
                assert steps[-1] == tl.total_steps, where
                assert all(a < b for a, b in itertools.pairwise(steps)), where
        expected_eval = brute_every_epochs(1, tl.steps_per_epoch, epochs) if every == 0 else by_steps
        assert eval_steps(every, tl) == expected_eval, where
