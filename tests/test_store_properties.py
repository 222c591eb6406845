"""Property tests of the store: writer -> reader round trips of random streams, and chunk shapes."""

from __future__ import annotations

import math
import queue
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.store.schema import ArraySpec, StreamSpec
from gentrace.store.writer import RowBlock, create_store

DTYPES = ["float32", "int32", "int16", "int64"]
CODEC_OF = {"float32": "float", "int32": "count", "int16": "count", "int64": "index"}

# Row shapes with dims of size 1 (and a scalar row); small, so that many examples run quickly.
row_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def streams(draw: st.DrawFn) -> tuple[StreamSpec, list[int]]:
    """A random stream (a step array plus 1-3 arrays) and the sizes of the blocks written to it."""
    rows_per_chunk = draw(st.integers(1, 5))
    arrays = [ArraySpec("s/step", (), "int64", "index", rows_per_chunk)]
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(DTYPES))
        arrays.append(ArraySpec(f"s/a{i}", draw(row_shapes), dtype, CODEC_OF[dtype], rows_per_chunk))
    blocks = draw(st.lists(st.integers(1, 4), min_size=0, max_size=6))
    total = sum(blocks)
    # Preallocation smaller than, equal to or larger than the rows finally written.
    rows = draw(st.sampled_from([0, 1, max(1, total // 2), total, total + 3]))
    return StreamSpec("s", rows, tuple(arrays)), blocks


def random_rows(spec: ArraySpec, start: int, count: int, seed: int) -> np.ndarray:
    """`count` rows of `spec`; never equal to a fill value, so a lost row cannot pass for a written one."""
    rng = np.random.default_rng(seed)
    shape = (count, *spec.row_shape)
    if spec.path.endswith("/step"):
        return np.arange(start, start + count, dtype=np.int64)
    if np.dtype(spec.dtype).kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    info = np.iinfo(spec.dtype)
    return rng.integers(0, info.max, shape, endpoint=True).astype(spec.dtype)


def wait_committed(reader: StoreReader, stream: str, rows: int) -> None:
    deadline = time.monotonic() + 20
    while reader.committed(stream) < rows:
        assert time.monotonic() < deadline, f"timed out waiting for {rows} committed rows"
        time.sleep(0.002)


@settings(max_examples=25, deadline=None)
@given(case=streams(), drained_together=st.booleans(), seed=st.integers(0, 2**16))
def test_writer_reader_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[StreamSpec, list[int]],
    drained_together: bool,
    seed: int,
) -> None:
    """Rows written in random blocks read back exactly, live (sliced to committed) and after close.

    `drained_together`: every block is queued before the writer thread starts, so it writes them
    in one batch; otherwise each block is committed before the next is put. Both are deterministic.
    """
    stream, blocks = case
    path = Path(tmp_path_factory.mktemp("prop")) / "run.zarr"
    writer = create_store(path, {"config": {}}, [stream], {})
    try:
        reader = StoreReader(path)
        written: dict[str, list[np.ndarray]] = {spec.path: [] for spec in stream.arrays}
        if drained_together:
            writer._queue = queue.Queue()  # unbounded: every block waits for one drain
        else:
            writer.start()
        start = 0
        for i, k in enumerate(blocks):
            rows = {spec.path: random_rows(spec, start, k, seed + 7 * i + j) for j, spec in enumerate(stream.arrays)}
            writer.put(RowBlock("s", start, rows))
            for p, values in rows.items():
                written[p].append(values)
            start += k
            if not drained_together:
                wait_committed(reader, "s", start)
        total = start
        expected = {
            spec.path: np.concatenate(written[spec.path])
            if written[spec.path]
            else np.zeros((0, *spec.row_shape), spec.dtype)
            for spec in stream.arrays
        }
        if drained_together:
            writer.start()
        wait_committed(reader, "s", total)
        assert reader.committed("s") == total
        for p, values in expected.items():
            np.testing.assert_array_equal(reader.array(p), values, err_msg=f"{p} of a live run")

        writer.close("complete")
        assert reader.committed("s") == total
        root = zarr.open_group(path, mode="r")
        for spec in stream.arrays:
            got = reader.array(spec.path)
            assert got.dtype == np.dtype(spec.dtype)
            assert got.shape == (total, *spec.row_shape)
            np.testing.assert_array_equal(got, expected[spec.path], err_msg=spec.path)
            assert root[spec.path].shape == (total, *spec.row_shape)
    finally:
        writer._lock.release()


@settings(max_examples=200, deadline=None)
@given(
    row_shape=st.lists(st.integers(1, 5000), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from(["float32", "int32", "int16", "int64", "uint8", "float16", "float64"]),
    rows_per_chunk=st.sampled_from([1, 2, 7, schema.BATCHED_MAX_ROWS, schema.SMALL_ROWS_PER_CHUNK]),
)
def test_chunks_stay_under_the_target_unless_rows_cannot_be_split(
    row_shape: tuple[int, ...], dtype: str, rows_per_chunk: int
) -> None:
    spec = ArraySpec("x/a", row_shape, dtype, "float", rows_per_chunk)
    chunks = spec.chunks()
    itemsize = np.dtype(dtype).itemsize
    assert len(chunks) == 1 + len(row_shape)
    assert chunks[0] == rows_per_chunk  # only the tensor is split, never the leading (row) axis
    for dim, size in zip(row_shape, chunks[1:], strict=True):
        assert 1 <= size <= dim, (row_shape, chunks)
    if math.prod(chunks) * itemsize > schema.CHUNK_TARGET_BYTES:
        # Only when every tensor dim is already split down to 1 element.
        assert all(size == 1 for size in chunks[1:]), (row_shape, chunks)
    # A row that fits is never split.
    if rows_per_chunk * math.prod(row_shape) * itemsize <= schema.CHUNK_TARGET_BYTES:
        assert chunks == (rows_per_chunk, *row_shape)


@pytest.mark.parametrize(
    ("row_shape", "expected"),
    [
        pytest.param((512, 512), (1, 512, 512), id="1MiB-tensor-whole"),
        pytest.param((2048, 1024), (1, 1024, 1024), id="8MiB-split-on-first-dim"),
        pytest.param((1, 4096, 4096), (1, 1, 256, 4096), id="first-dim-1-split-second"),
        pytest.param((), (1,), id="scalar-row"),
        pytest.param((0, 3), (1, 1, 3), id="empty-tensor"),
    ],
)
def test_chunk_examples(row_shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert ArraySpec("x/a", row_shape, "float32", "float").chunks() == expected
