"""An analysis as a list of independent chunk tasks: run here one after the other, or on a dask cluster.

SPEC section 6: analyses read the store lazily in chunks, so memory stays bounded for a store larger
than RAM, and `--dask SCHEDULER` runs them on a dask.distributed cluster. Both come from one plan:

    plan.tasks     Task(fn, args): a module-level function and picklable arguments (the store *path*,
                   row numbers, options; never an open reader or an array), returning the frame of one
                   chunk: one row block of a stream (gsnr: a recorded step and replicate; paths: a block
                   of epochs of one layer; mi: a block of prediction rows of one replicate)
    plan.finish    optional, run where the frames are gathered: turns the task frames, in task order,
                   into the output frames (paths ratio: one row per layer; mi --summary: one per replicate)

`local` runs the tasks in order in this process, holding one chunk at a time;
`gentrace.analyses.dask_backend.frames` submits them to a cluster and gathers the frames in the same
order. A task computes exactly what it would compute here, so both give the same table.

`row_blocks` is the chunked reader the tasks share: one row of a [rows, M, *shape] stream array read in
blocks along the tensor's first axis (the axis the store splits large tensors on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# Bytes of one block read by `row_blocks`: float64 temporaries of a block then stay near 10x this.
BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Task:
    """One chunk of an analysis: `fn(*args)` -> a DataFrame or an iterator of them (one per epoch, say).

    Picklable, so a dask worker can run it; here its frames are consumed one at a time as they come.
    """

    fn: Callable[..., pd.DataFrame | Iterable[pd.DataFrame]]
    args: tuple[Any, ...]

    def __call__(self) -> Iterator[pd.DataFrame]:
        """Run the task, yielding its frames."""
        out = self.fn(*self.args)
        if isinstance(out, pd.DataFrame):
            yield out
        else:
            yield from out


Finish = Callable[[Iterator[pd.DataFrame]], Iterable[pd.DataFrame]]


@dataclass(frozen=True)
class Plan:
    """The tasks of an analysis in output order, and what to do with their frames once gathered."""

    tasks: list[Task]
    finish: Finish | None = field(default=None)

    def output(self, frames: Iterator[pd.DataFrame]) -> Iterable[pd.DataFrame]:
        """The output frames from the task frames (in task order, wherever they ran): `finish` applied."""
        return frames if self.finish is None else self.finish(frames)


def local(plan: Plan) -> Iterator[pd.DataFrame]:
    """Run the tasks in order in this process: one chunk in memory at a time."""
    yield from plan.output(frame for task in plan.tasks for frame in task())


def blocks(total: int, parts: int) -> list[tuple[int, int]]:
    """Split range(total) into at most `parts` contiguous (start, stop) blocks of near-equal size."""
    parts = max(1, min(parts, total))
    edges = np.linspace(0, total, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def row_ranges(total: int, max_rows: int, parts: int = 1) -> list[tuple[int, int]]:
    """Contiguous (start, stop) blocks of range(total): at most max_rows each, and at least `parts` of them."""
    return blocks(total, max(parts, -(-total // max(1, max_rows))))


def row_blocks(
    arrays: Sequence[Any], row: int, index: int | slice, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[np.ndarray, ...]]:
    """`a[row, index]` of each of several [rows, M, *shape] zarr arrays, read in blocks along shape[0].

    `index` is one replicate m (blocks [k, *shape[1:]]) or a slice of them (blocks [M', k, *shape[1:]]).

    Blocks are whole zarr chunks (of the first array) along that axis, as many as fit in `block_bytes`
    (at least one), so each stored chunk is decoded once. Each block is a contiguous range of flat
    indices: concatenating the raveled blocks gives the raveled row.

    Yields:
        One tuple per block: the block of every array.
    """
    first = arrays[0]
    shape = tuple(first.shape[2:])
    replicates = len(range(first.shape[1])[index]) if isinstance(index, slice) else 1
    if not shape:
        yield tuple(np.asarray(a[row, index]) for a in arrays)
        return
    per_index = int(np.prod(shape[1:], dtype=np.int64)) * first.dtype.itemsize  # bytes of one index of shape[0]
    chunk = int(first.chunks[2])
    step = max(chunk, block_bytes // max(1, per_index * replicates * len(arrays)) // chunk * chunk)
    for lo in range(0, shape[0], step):
        yield tuple(np.asarray(a[row, index, lo : lo + step]) for a in arrays)
