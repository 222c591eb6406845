"""No host synchronization per optimizer step: per-step streams reach the host a block at a time.

Every copy of recorded data from the training device to the host goes through
`gentrace.record.base.to_host`; the test wraps it during a CPU run of 100 steps that records the three
per-step streams (metrics_fine, params_fine, lipschitz_fine) at every step, and counts: one copy per
block and stream, and the loop's divergence checks only where something is recorded (the epoch ends),
never one per step. On a GPU each avoided copy is a stall of the training stream.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gentrace.core import config
from gentrace.record import base
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.training.run import record

EPOCHS, STEPS_PER_EPOCH = 20, 5
SETS = [
    "data.name=sinusoid",
    "data.dim=10",
    "data.n_train=100",
    "data.n_test=50",
    "model.hidden=[16]",
    "train.batch_size=20",
    f"train.epochs={EPOCHS}",
    "train.replicates=2",
    "record.params.every_epochs=0",
    "record.predictions.every_epochs=0",
    "record.grad_moments.every_epochs=0",
    "record.activations.every_epochs=0",
    "record.params_fine.every_steps=1",
    "record.lipschitz_fine.every_steps=1",
]
PER_STEP = (schema.METRICS_FINE.name, schema.PARAMS_FINE.name, schema.LIPSCHITZ_FINE.name)


def test_per_step_streams_copy_once_per_block_and_the_loop_never_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies: Counter[str] = Counter()
    original = base.to_host

    def counting(values: object, fresh: bool = False) -> np.ndarray:
        caller = sys._getframe(1)
        copies[caller.f_locals.get("stream", caller.f_code.co_name)] += 1
        return original(values, fresh)  # type: ignore[arg-type]

    monkeypatch.setattr(base, "to_host", counting)
    store = record(config.load(None, SETS), tmp_path / "s.zarr", device="cpu")
    reader = StoreReader(store)
    steps = EPOCHS * STEPS_PER_EPOCH
    for stream in PER_STEP:
        assert reader.committed(stream) >= steps, stream  # every step recorded (params_fine: step 0 too)
        blocks = -(-reader.committed(stream) // max(1, _rows_per_block(stream)))
        assert 1 <= copies[stream] <= blocks, (stream, copies[stream], blocks)
    checks = copies["first"]  # DivergenceWatch.first: one read where something is recorded, not per step
    assert 1 <= checks <= EPOCHS + 2, checks
    assert sum(copies.values()) < steps / 4, copies


def _rows_per_block(stream: str) -> int:
    """The largest block a per-step probe hands over (its buffer limit)."""
    from gentrace.record.lipschitz_fine import LipschitzFineProbe
    from gentrace.record.metrics_fine import FLUSH_ROWS

    if stream == schema.METRICS_FINE.name:
        return FLUSH_ROWS
    if stream == schema.LIPSCHITZ_FINE.name:
        return LipschitzFineProbe.buffer_limit
    return schema.BATCHED_MAX_ROWS
