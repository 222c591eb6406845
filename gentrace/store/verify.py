"""`gentrace verify STORE`: read every committed chunk and every checkpoint; report damage per stream.

A store is sound when every array of every stream opens, holds at least its committed rows, and
every chunk of those rows is present and matches its crc32c checksum (gentrace.store.integrity);
when the static `data/` arrays read whole; when the checkpoint the store names exists; and when
every checkpoint on disk reads whole. The committed `step` of every stream is also checked to hold
no fill value (-1), which catches damage in stores written before checksums (schema version 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gentrace.core.errors import GentraceError
from gentrace.store import schema
from gentrace.store.integrity import Damage, StreamReport, read_blocks, reason_of
from gentrace.store.reader import StoreReader


def verify(path: Path | str, on_array: Callable[[str], None] | None = None) -> list[StreamReport]:
    """One report per stream (then `data`, `checkpoints`); raises StoreError when the root itself is unusable."""
    reader = StoreReader(path, compacting_ok=True, check_checkpoint=False)
    reports = []
    for stream, paths in reader.streams().items():
        report = StreamReport(stream, rows=reader.committed(stream))
        for array_path in paths:
            _check_array(reader, array_path, report.rows, report)
            if on_array is not None:
                on_array(array_path)
        step = schema.step_of(stream)
        if step in paths and not any(d.array == step for d in report.damaged):
            _check_steps(reader, stream, report)
        reports.append(report)
    data = StreamReport(schema.DATA.name)
    static = [p for p in reader.array_paths() if schema.stream_of(p) == schema.DATA.name]
    for array_path in static:
        _check_array(reader, array_path, None, data)
    data.rows = max((int(reader.lazy(p).shape[0]) for p in static), default=0)
    reports.append(data)
    reports.append(_check_checkpoints(reader))
    return reports


def _check_array(reader: StoreReader, array_path: str, rows: int | None, report: StreamReport) -> None:
    report.arrays += 1
    try:
        array = reader.lazy(array_path)
    except GentraceError as exc:
        report.damaged.append(Damage(array_path, None, reason_of(exc)))
        return
    need = int(array.shape[0]) if rows is None else rows
    if int(array.shape[0]) < need:
        report.damaged.append(
            Damage(array_path, (int(array.shape[0]), need - 1), "past the end of the array (committed but not there)")
        )
        need = int(array.shape[0])
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize
    grid = array.shards if array.shards is not None else array.chunks  # files: shards of a compacted array
    per_row_block = math.prod(math.ceil(n / c) for n, c in zip(array.shape[1:], grid[1:], strict=True))
    for first, last, error in read_blocks(array, need):
        report.chunks += math.ceil((last - first + 1) / grid[0]) * per_row_block
        report.bytes += (last - first + 1) * row_bytes
        if error is not None:
            _add(report, Damage(array_path, (first, last), reason_of(error)))


def _add(report: StreamReport, damage: Damage) -> None:
    """Merge a damaged block into the previous one when they are adjacent with the same reason kind."""
    if report.damaged:
        previous = report.damaged[-1]
        if (
            previous.array == damage.array
            and previous.rows is not None
            and damage.rows is not None
            and previous.rows[1] + 1 == damage.rows[0]
            and _kind(previous.reason) == _kind(damage.reason)
        ):
            previous.rows = (previous.rows[0], damage.rows[1])
            return
    report.damaged.append(damage)


def _kind(reason: str) -> str:
    return reason.split(" is ")[-1]


def _check_steps(reader: StoreReader, stream: str, report: StreamReport) -> None:
    path = schema.step_of(stream)
    try:
        steps = reader.array(path)
    except GentraceError:
        return  # already reported by the chunk walk
    bad = np.flatnonzero(steps < 0)
    if len(bad):
        report.damaged.append(
            Damage(path, (int(bad[0]), int(bad[-1])), f"{len(bad)} committed rows hold the fill value -1")
        )


def _check_checkpoints(reader: StoreReader) -> StreamReport:
    report = StreamReport(schema.CHECKPOINT_GROUP)
    steps = reader.checkpoint_steps()
    named = reader.attrs.get(schema.CHECKPOINT_ATTR)
    if isinstance(named, int) and named >= 0 and named not in steps:
        report.damaged.append(Damage(schema.checkpoint_path(named), None, "missing"))
    for step in steps:
        report.arrays += 1
        report.rows += 1
        try:
            report.bytes += len(reader.checkpoint(step))
            report.chunks += 1  # a checkpoint is one chunk
        except GentraceError as exc:
            report.damaged.append(Damage(schema.checkpoint_path(step), None, reason_of(exc)))
    return report
