"""The store contract (SPEC section 3): write rows, reopen read-only, slice to committed, resume, errors.

One suite for the writer/reader pair on local directory stores (the only kind the writer supports:
its single-writer lock is an flock on the store directory). Every test goes through the public
builders of `gentrace.store.schema`, so the layout checked here is the schema's, and the same store
is also read back with plain `zarr.open_group`, as a user without gentrace would.
"""

from __future__ import annotations

import errno
import json
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
import zarr.core.array
from zarr.codecs import BloscCodec, ZstdCodec

from gentrace.core.errors import SchemaVersionError, StoreError, WriterError
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.store.schema import StreamSpec
from gentrace.store.writer import RowBlock, StoreWriter, create_store, open_for_resume

M = 2  # replicates
SHAPES = {"0.weight": (3, 4), "0.bias": (3,)}
FINE_SHAPES = {"0.bias": (3,)}
SPLITS = {"train": 5, "test": 4}
STEP_STRIDE = 10  # row i of every stream is taken at optimizer step 10 * i
WAIT_S = 20.0


def all_streams(rows: int, *, regression: bool = False) -> list[StreamSpec]:
    """One stream of every kind the recorder writes, preallocated at `rows` rows."""
    return [
        schema.metrics_stream(rows, M),
        schema.metrics_fine_stream(rows, M),
        schema.tensor_stream("params", rows, M, SHAPES),
        schema.tensor_stream("params_fine", rows, M, FINE_SHAPES, batched=True),
        schema.preds_stream(rows, M, SPLITS, regression=regression),
    ]


def stream_named(streams: list[StreamSpec], name: str) -> StreamSpec:
    return next(s for s in streams if s.name == name)


def static_arrays(*, regression: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n, n_test = 6, 4
    if regression:
        labels_train: np.ndarray = rng.standard_normal((M, n)).astype(np.float32)
        labels_test: np.ndarray = rng.standard_normal(n_test).astype(np.float32)
    else:
        labels_train, labels_test = rng.integers(0, 10, (M, n)), rng.integers(0, 10, n_test)
    return schema.data_arrays(
        train_index=np.arange(M * n).reshape(M, n),
        test_index=np.arange(n_test) + 100,
        labels_train=labels_train,
        labels_test=labels_test,
        noise_mask=rng.random((M, n)) < 0.4,
    )


def fake_rows(stream: StreamSpec, start: int, count: int) -> dict[str, np.ndarray]:
    """Rows `start .. start+count` of every array of `stream`; never equal to a fill value."""
    rng = np.random.default_rng(1000 * start + count)
    rows: dict[str, np.ndarray] = {}
    for spec in stream.arrays:
        shape = (count, *spec.row_shape)
        if spec.path == stream.step_path:
            rows[spec.path] = STEP_STRIDE * np.arange(start, start + count, dtype=np.int64)
        elif np.dtype(spec.dtype).kind == "f":
            rows[spec.path] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            rows[spec.path] = rng.integers(0, 1000, shape).astype(spec.dtype)
    return rows


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def wait_committed(path: Path, stream: str, rows: int) -> None:
    reader = StoreReader(path)
    wait_until(lambda: reader.committed(stream) >= rows, f"{rows} committed rows of {stream}")


def write_rows(
    writer: StoreWriter, stream: StreamSpec, start: int, count: int, *, block: int = 1
) -> dict[str, np.ndarray]:
    """Put rows `start .. start+count` in blocks of `block` rows, each committed before the next.

    Waiting keeps these tests deterministic; blocks that the writer drains together are the
    subject of `test_blocks_drained_together_into_one_chunk_are_all_kept`.
    """
    parts: list[dict[str, np.ndarray]] = []
    for first in range(start, start + count, block):
        k = min(block, start + count - first)
        rows = fake_rows(stream, first, k)
        writer.put(RowBlock(stream.name, first, rows))
        wait_committed(writer.path, stream.name, first + k)
        parts.append(rows)
    return {p: np.concatenate([part[p] for part in parts]) for p in parts[0]}


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[..., StoreWriter]]:
    """Factory of started writers on fresh stores under tmp_path; every lock is freed at teardown."""
    writers: list[StoreWriter] = []

    def make(
        name: str = "run.zarr",
        *,
        streams: list[StreamSpec] | None = None,
        attrs: dict[str, Any] | None = None,
        regression: bool = False,
        start: bool = True,
    ) -> StoreWriter:
        writer = create_store(
            tmp_path / name,
            attrs if attrs is not None else {"config": {"train": {"lr": 0.1}}},
            streams if streams is not None else all_streams(4, regression=regression),
            static_arrays(regression=regression),
        )
        writers.append(writer)
        if start:
            writer.start()
        return writer

    yield make
    for writer in writers:
        writer._lock.release()


def codec_key(codec: Any) -> tuple[Any, ...]:
    """The codec settings that matter, comparable between a fresh codec and one read from disk."""
    if isinstance(codec, BloscCodec):
        return ("blosc", codec.cname.value, codec.clevel, codec.shuffle.value)
    if isinstance(codec, ZstdCodec):
        return ("zstd", codec.level)
    return (type(codec).__name__,)


def is_fill(values: np.ndarray) -> np.ndarray:
    """Which elements hold the schema's fill value (NaN for floats, -1 for integers)."""
    return np.isnan(values) if values.dtype.kind == "f" else values == -1


def set_root_attr(path: Path, key: str, value: Any) -> None:
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"][key] = value
    meta_file.write_text(json.dumps(meta))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("regression", [False, True], ids=["classes", "regression"])
def test_rows_round_trip_through_reader_and_plain_zarr(
    make_store: Callable[..., StoreWriter], regression: bool
) -> None:
    streams = all_streams(4, regression=regression)
    writer = make_store(streams=streams, regression=regression)
    written: dict[str, np.ndarray] = {}
    counts = {"metrics": 4, "metrics_fine": 3, "params": 2, "params_fine": 4, "preds": 0}
    for stream in streams:
        if counts[stream.name]:
            written |= write_rows(writer, stream, 0, counts[stream.name], block=2)
    writer.close("complete")

    reader = StoreReader(writer.path)
    assert reader.status == "complete"
    assert reader.attrs["finished"]
    assert {s: reader.committed(s) for s in counts} == counts
    assert reader.streams() == {s.name: [a.path for a in s.arrays] for s in streams}
    for path, values in written.items():
        np.testing.assert_array_equal(reader.array(path), values, err_msg=path)
        assert reader.array(path).dtype == values.dtype, path
    for path, values in static_arrays(regression=regression).items():
        np.testing.assert_array_equal(reader.array(path), values, err_msg=path)
        assert reader.array(path).dtype == values.dtype, path
    assert reader.array("preds/train").shape == (0, M, SPLITS["train"])

    root = zarr.open_group(writer.path, mode="r")
    for stream in streams:
        for spec in stream.arrays:
            array = root[spec.path]
            assert isinstance(array, zarr.Array)
            # After a clean finish every array is resized to exactly its committed rows.
            assert array.shape == (counts[stream.name], *spec.row_shape), spec.path
            if spec.path in written:
                np.testing.assert_array_equal(array[...], written[spec.path], err_msg=spec.path)
    for path, values in static_arrays(regression=regression).items():
        np.testing.assert_array_equal(root[path][...], values, err_msg=path)


def test_layout_dtypes_chunks_codecs_and_fill_values_follow_the_schema(make_store: Callable[..., StoreWriter]) -> None:
    streams = all_streams(4)
    writer = make_store(streams=streams)
    root = zarr.open_group(writer.path, mode="r")
    for stream in streams:
        for spec in stream.arrays:
            array = root[spec.path]
            assert isinstance(array, zarr.Array)
            assert array.dtype == np.dtype(spec.dtype), spec.path
            assert array.chunks == spec.chunks(), spec.path
            actual = [codec_key(c) for c in array.compressors]
            assert actual == [codec_key(c) for c in schema.CODECS[spec.codec]()], spec.path
            if np.dtype(spec.dtype).kind == "f":
                # SPEC: float32 compresses ~1.1x: fast lz4 with shuffle, never zarr's default zstd-3.
                assert actual == [("blosc", "lz4", 5, "shuffle"), ("Crc32cCodec",)], spec.path
                assert math.isnan(array.fill_value), spec.path
            else:
                assert array.fill_value == -1, spec.path
            assert ("zstd", 3) not in actual, spec.path  # zarr's default
            assert actual[-1] == ("Crc32cCodec",), spec.path  # every chunk checksummed (issue 12)
    # Chunking rules (README, "Chunks"): per-recorded-row arrays hold as many rows as fit ~1 MiB, spread
    # evenly over the preallocated rows (here all 4 in one chunk); a row of 1 MiB or more is a chunk of its
    # own; metrics many rows per chunk.
    assert root["params/0.weight"].chunks == (4, M, 3, 4)
    assert root["params/step"].chunks == (4,)
    assert root["preds/train"].chunks == (4, M, SPLITS["train"])
    assert schema.packed_rows((2, 128, 64), "float32", 21) == 11  # 64 KiB rows: 2 chunks of 11, not 16 + 5
    assert schema.packed_rows((2, 128, 64), "float32", 100) == 15  # 7 chunks of at most 16
    assert schema.packed_rows((2, 512, 256), "float32", 100) == 1  # 1 MiB: one row per chunk
    assert schema.packed_rows((), "int64", 100_000) == 1021  # at most PACKED_MAX_ROWS (1024)
    big = schema.grad_stream(10, 2, {"w": (2048, 1024)}).arrays[-1]
    assert big.chunks() == (1, 1, 1024, 1024)  # 16 MiB rows: split along the first dims above ~4 MiB, as before
    assert root["metrics/train_loss"].chunks == (4, M)
    assert root["metrics_fine/batch_loss"].chunks == (4, M)
    assert schema.metrics_stream(100_000, M).arrays[0].chunks() == (schema.SMALL_ROWS_PER_CHUNK,)
    # Preallocated rows that were never written read back as visibly wrong fill values.
    for stream in streams:
        for spec in stream.arrays:
            assert is_fill(root[spec.path][...]).all(), spec.path
    writer.close("complete")


def test_attrs_round_trip(make_store: Callable[..., StoreWriter]) -> None:
    attrs = {
        "config": {"data": {"name": "digits", "n_train": 500}, "model": {"hidden": [128, 128]}},
        "nested": {"list": [1, 2.5, "three", None, True, {"deep": []}]},
        "unicode": "μ σ² ✓",
        "empty": {},
        "float": 1e-12,
        "steps_per_epoch": 16,
    }
    writer = make_store(attrs=attrs)
    writer.close("complete")
    reader = StoreReader(writer.path)
    for key, value in attrs.items():
        assert reader.attrs[key] == value, key
    assert reader.config == attrs["config"]
    assert reader.attrs["format"] == schema.FORMAT_NAME
    assert reader.attrs["schema_version"] == schema.SCHEMA_VERSION
    assert reader.attrs["created"] <= reader.attrs["finished"]
    assert reader.attrs["writer"]["blocks"] == 0
    assert zarr.open_group(writer.path, mode="r").attrs["unicode"] == "μ σ² ✓"


def test_dask_reads_the_store(make_store: Callable[..., StoreWriter]) -> None:
    da = pytest.importorskip("dask.array")
    streams = all_streams(4)
    writer = make_store(streams=streams)
    written = write_rows(writer, stream_named(streams, "params"), 0, 3)
    writer.close("complete")
    lazy = da.from_zarr(str(writer.path), component="params/0.weight")
    np.testing.assert_array_equal(lazy.compute(), written["params/0.weight"])


# -- readers slice to committed -----------------------------------------------------------------


def test_reader_of_a_live_run_sees_only_committed_rows(make_store: Callable[..., StoreWriter]) -> None:
    streams = all_streams(10)
    writer = make_store(streams=streams)
    reader = StoreReader(writer.path)
    assert reader.status == "running"
    assert reader.committed("metrics") == 0
    assert reader.array("metrics/train_loss").shape == (0, M)

    metrics = stream_named(streams, "metrics")
    written = write_rows(writer, metrics, 0, 3)
    written |= write_rows(writer, stream_named(streams, "params"), 0, 2)
    root = zarr.open_group(writer.path, mode="r")
    assert root["metrics/train_loss"].shape == (10, M)  # preallocated, longer than committed
    assert is_fill(root["metrics/train_loss"][3:]).all()
    assert is_fill(root["params/0.weight"][2:]).all()
    for path, values in written.items():
        np.testing.assert_array_equal(reader.array(path), values, err_msg=path)
        assert reader.rows(path) == len(values), path
        blocks = [rows for _, rows in reader.iter_rows(path, block=2)]
        np.testing.assert_array_equal(np.concatenate(blocks), values, err_msg=path)
        assert reader.lazy(path).shape[0] == 10, path
    assert reader.logical_bytes("metrics/train_loss") == 3 * M * 4
    assert reader.status == "running"

    # A live reader keeps up with the run: attrs and arrays are re-read on every access.
    more = write_rows(writer, metrics, 3, 2)
    np.testing.assert_array_equal(
        reader.array("metrics/step"), np.concatenate([written["metrics/step"], more["metrics/step"]])
    )

    # No process holds the lock, yet the status still says running: the writer was killed.
    writer._lock.release()
    assert reader.status == "killed"
    assert StoreReader(writer.path).status == "killed"
    assert reader.committed("metrics") == 5


def test_arrays_grow_past_their_preallocation(make_store: Callable[..., StoreWriter]) -> None:
    streams = all_streams(2)
    writer = make_store(streams=streams)
    written: dict[str, np.ndarray] = {}
    for name in ("metrics", "params", "params_fine"):
        written |= write_rows(writer, stream_named(streams, name), 0, 7, block=3)
    reader = StoreReader(writer.path)
    root = zarr.open_group(writer.path, mode="r")
    for name in ("metrics", "params", "params_fine"):
        assert reader.committed(name) == 7
    for path, values in written.items():
        assert root[path].shape[0] >= 7, path
        np.testing.assert_array_equal(reader.array(path), values, err_msg=path)
    writer.close("complete")
    root = zarr.open_group(writer.path, mode="r")
    for path, values in written.items():
        assert root[path].shape[0] == 7, path
        np.testing.assert_array_equal(root[path][...], values, err_msg=path)


def test_blocks_drained_together_into_one_chunk_are_all_kept(make_store: Callable[..., StoreWriter]) -> None:
    # Metrics chunks hold many rows. When the writer drains several queued blocks of one stream in
    # one batch, their rows land in the same chunk: every row must survive, not only the last
    # block's (committed says they are safely written).
    streams = all_streams(8)
    writer = make_store(streams=streams, start=False)
    writer._queue = queue.Queue()  # unbounded, so that every block is queued before the writer runs
    metrics = stream_named(streams, "metrics")
    parts = [fake_rows(metrics, start, 2) for start in range(0, 8, 2)]
    for start, rows in zip(range(0, 8, 2), parts, strict=True):
        writer.put(RowBlock("metrics", start, rows))
    writer.start()
    writer.close("complete")
    reader = StoreReader(writer.path)
    assert reader.committed("metrics") == 8
    for path in parts[0]:
        expected = np.concatenate([rows[path] for rows in parts])
        np.testing.assert_array_equal(reader.array(path), expected, err_msg=path)


# -- checkpoints ---------------------------------------------------------------------------------


def test_the_two_latest_committed_checkpoints_are_kept(make_store: Callable[..., StoreWriter]) -> None:
    streams = all_streams(6)
    params = stream_named(streams, "params")
    writer = make_store(streams=streams)
    reader = StoreReader(writer.path)
    assert reader.checkpoint_steps() == []
    payloads = {row: bytes(np.random.default_rng(row).integers(0, 256, 100 + row, dtype=np.uint8)) for row in range(5)}
    for row in range(2):
        writer.put(RowBlock("params", row, fake_rows(params, row, 1), payloads[row], checkpoint_step=STEP_STRIDE * row))
        wait_committed(writer.path, "params", row + 1)
        # Older checkpoints are pruned right after the commit that supersedes them; the one before
        # the newest stays, so a damaged newest checkpoint still leaves one to resume from.
        kept = [STEP_STRIDE * r for r in range(max(0, row - 1), row + 1)]
        wait_until(lambda kept=kept: reader.checkpoint_steps() == kept, "the older checkpoint pruned")
        assert reader.checkpoint(STEP_STRIDE * row) == payloads[row]
        assert reader.attrs["checkpoint_step"] == STEP_STRIDE * row
    # A snapshot without a checkpoint keeps the previous ones.
    writer.put(RowBlock("params", 2, fake_rows(params, 2, 1)))
    wait_committed(writer.path, "params", 3)
    assert reader.checkpoint_steps() == [0, STEP_STRIDE]
    for row in (3, 4):
        writer.put(RowBlock("params", row, fake_rows(params, row, 1), payloads[row], checkpoint_step=STEP_STRIDE * row))
    writer.close("complete")
    assert reader.checkpoint_steps() == [STEP_STRIDE * 3, STEP_STRIDE * 4]
    assert reader.checkpoint(STEP_STRIDE * 4) == payloads[4]
    with pytest.raises(StoreError, match="no checkpoint for step 10"):
        reader.checkpoint(STEP_STRIDE)
    # Checkpoints are plain zarr arrays: the store stays readable without gentrace.
    root = zarr.open_group(writer.path, mode="r")
    assert bytes(root[f"checkpoints/{schema.checkpoint_name(40)}"][...]) == payloads[4]


# -- resume -------------------------------------------------------------------------------------


def _interrupted_store(make_store: Callable[..., StoreWriter]) -> tuple[Path, dict[str, np.ndarray]]:
    """A store with 6 rows of metrics and params, closed as interrupted (as after Ctrl-C)."""
    streams = all_streams(10)
    writer = make_store(streams=streams)
    written = write_rows(writer, stream_named(streams, "metrics"), 0, 6, block=3)
    written |= write_rows(writer, stream_named(streams, "params"), 0, 6)
    writer.close("interrupted")
    return writer.path, written


def test_truncate_then_declare_is_the_resume_path(make_store: Callable[..., StoreWriter]) -> None:
    path, written = _interrupted_store(make_store)
    streams = all_streams(10)
    writer = open_for_resume(path)
    try:
        reader = StoreReader(path)
        assert reader.status == "running"
        writer.truncate({"metrics": 4, "params": 3})
        writer.truncate({"params": 5})  # never grows what was cut
        assert (reader.committed("metrics"), reader.committed("params")) == (4, 3)
        # shapes never shrink in a truncation (a kill could otherwise leave one below `committed`)
        assert zarr.open_group(path, mode="r")["metrics/train_loss"].shape[0] >= 4
        writer.declare(streams)
        root = zarr.open_group(path, mode="r")
        for stream in streams:
            for spec in stream.arrays:
                assert root[spec.path].shape[0] == 10, spec.path  # regrown to the preallocated length
        for path_, values in written.items():
            keep = 4 if path_.startswith("metrics/") else 3
            np.testing.assert_array_equal(reader.array(path_), values[:keep], err_msg=path_)

        writer.start()
        more = write_rows(writer, stream_named(streams, "metrics"), 4, 3)
        more |= write_rows(writer, stream_named(streams, "params"), 3, 1)
        writer.close("complete")
    finally:
        writer._lock.release()
    assert reader.status == "complete"
    root = zarr.open_group(path, mode="r")
    for path_, values in written.items():
        keep = 4 if path_.startswith("metrics/") else 3
        expected = np.concatenate([values[:keep], more[path_]])
        np.testing.assert_array_equal(reader.array(path_), expected, err_msg=path_)
        np.testing.assert_array_equal(root[path_][...], expected, err_msg=path_)


def test_truncated_rows_read_as_fill_values_after_regrowing(make_store: Callable[..., StoreWriter]) -> None:
    # SPEC: rows past committed hold fill values "so a stray read is visibly wrong". Rows cut by a
    # resume must not come back as plausible old data when the array is regrown, even where they
    # shared a chunk with kept rows (metrics chunks hold many rows).
    path, _ = _interrupted_store(make_store)
    writer = open_for_resume(path)
    try:
        writer.truncate({"metrics": 4, "params": 3})
        writer.declare(all_streams(10))
        root = zarr.open_group(path, mode="r")
        for array_path in ("params/0.weight", "params/step", "metrics/step", "metrics/train_loss", "metrics/lr"):
            keep = 4 if array_path.startswith("metrics/") else 3
            tail = root[array_path][keep:]
            assert is_fill(tail).all(), f"{array_path}: rows past committed read {tail.ravel()[:8]}"
    finally:
        writer._lock.release()


def test_open_for_resume_deletes_leftover_partial_files(make_store: Callable[..., StoreWriter]) -> None:
    path, written = _interrupted_store(make_store)
    leftovers = [path / "zarr.json.partial", path / "params" / "0.weight" / "c" / "7.partial"]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"torn")
    writer = open_for_resume(path)
    writer.close("interrupted")
    assert not [p for p in leftovers if p.exists()]
    assert not list(path.rglob("*.partial"))
    np.testing.assert_array_equal(StoreReader(path).array("params/0.weight"), written["params/0.weight"])


# -- errors -------------------------------------------------------------------------------------


def test_existing_path_without_overwrite_is_refused(make_store: Callable[..., StoreWriter], tmp_path: Path) -> None:
    writer = make_store()
    writer.close("complete")
    before = snapshot(writer.path)
    with pytest.raises(StoreError, match="already exists"):
        create_store(writer.path, {}, all_streams(4), {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        create_store(tmp_path / "empty", {}, all_streams(4), {})
    assert snapshot(writer.path) == before


def test_overwrite_replaces_a_finished_store(make_store: Callable[..., StoreWriter]) -> None:
    writer = make_store(attrs={"config": {"old": True}})
    write_rows(writer, all_streams(4)[0], 0, 2)
    writer.close("complete")
    replacement = create_store(writer.path, {"config": {"new": True}}, all_streams(4), {}, overwrite=True)
    try:
        reader = StoreReader(writer.path)
        assert reader.config == {"new": True}
        assert reader.committed("metrics") == 0
        assert reader.status == "running"
    finally:
        replacement._lock.release()


@pytest.mark.parametrize(
    "kind",
    ["foreign-files", "zarr-group-without-format-attr", "plain-file"],
)
def test_overwrite_never_deletes_what_is_not_a_gentrace_store(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "precious"
    if kind == "foreign-files":
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
        (target / "figures").mkdir()
        (target / "figures" / "fig1.png").write_bytes(b"\x89PNG")
    elif kind == "zarr-group-without-format-attr":
        zarr.open_group(target, mode="w", attributes={"owner": "someone else"})
        zarr.open_group(target, mode="a").create_array("x", shape=(3,), dtype="int8")[...] = [1, 2, 3]
    else:
        target.write_text("not a directory")
    before = snapshot(target) if target.is_dir() else {"": target.read_bytes()}
    with pytest.raises(StoreError, match=re.escape(str(target))):
        create_store(target, {}, all_streams(4), {}, overwrite=True)
    after = snapshot(target) if target.is_dir() else {"": target.read_bytes()}
    assert after == before


def test_a_zarr_group_that_is_not_a_gentrace_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.zarr"
    zarr.open_group(path, mode="w", attributes={"schema_version": 1})
    with pytest.raises(StoreError, match="not a gentrace store") as info:
        StoreReader(path)
    assert not isinstance(info.value, SchemaVersionError)
    with pytest.raises(StoreError, match="not a gentrace store"):
        open_for_resume(path)


@pytest.mark.parametrize("version", [schema.SCHEMA_VERSION + 1, "1", None], ids=["newer", "string", "missing"])
def test_unreadable_schema_version_is_refused(make_store: Callable[..., StoreWriter], version: object) -> None:
    writer = make_store()
    writer.close("complete")
    set_root_attr(writer.path, "schema_version", version)
    with pytest.raises(SchemaVersionError, match="upgrade gentrace"):
        StoreReader(writer.path)
    with pytest.raises(SchemaVersionError):
        open_for_resume(writer.path)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(make_store: Callable[..., StoreWriter]) -> None:
    streams = all_streams(4)
    writer = make_store(streams=streams)
    written = write_rows(writer, stream_named(streams, "params"), 0, 2)
    with pytest.raises(StoreError, match="being written by another gentrace process"):
        open_for_resume(writer.path)
    with pytest.raises(StoreError, match="being written by another gentrace process"):
        create_store(writer.path, {}, streams, {}, overwrite=True)
    # The refused writers touched nothing: the first one carries on.
    reader = StoreReader(writer.path)
    assert reader.status == "running"
    more = write_rows(writer, stream_named(streams, "params"), 2, 1)
    writer.close("complete")
    written = {path: np.concatenate([values, more[path]]) for path, values in written.items()}
    for path, values in written.items():
        np.testing.assert_array_equal(reader.array(path), values, err_msg=path)
    # Once the first writer is done, resuming is allowed again.
    open_for_resume(writer.path).close("complete")


def _fail_writes_with_enospc(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    async def no_space(self: zarr.core.array.AsyncArray, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(root / self.path))

    def no_space_file(self: Path, *args: Any, **kwargs: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(zarr.core.array.AsyncArray, "setitem", no_space)
    monkeypatch.setattr(Path, "write_bytes", no_space_file)  # the writer's direct whole-row chunk path


def test_writer_failure_is_raised_at_the_next_put(
    make_store: Callable[..., StoreWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    streams = all_streams(6)
    params = stream_named(streams, "params")
    writer = make_store(streams=streams)
    written = write_rows(writer, params, 0, 2)
    _fail_writes_with_enospc(monkeypatch, writer.path)
    writer.put(RowBlock("params", 2, fake_rows(params, 2, 1)))

    def put_until_it_fails() -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            writer.put(RowBlock("params", 3, fake_rows(params, 3, 1)))
            time.sleep(0.01)

    with pytest.raises(WriterError, match="the disk is full: writing .*params/.* failed") as info:
        put_until_it_fails()
    assert str(writer.path) in str(info.value)
    assert "--resume" in str(info.value)
    with pytest.raises(WriterError, match="the disk is full"):
        writer.close("complete")
    monkeypatch.undo()
    reader = StoreReader(writer.path)
    assert reader.committed("params") == 2
    for path, values in written.items():
        np.testing.assert_array_equal(reader.array(path), values, err_msg=path)
    assert reader.status == "failed"
    assert "the disk is full" in reader.attrs["error"]


def test_writer_failure_is_raised_at_close(
    make_store: Callable[..., StoreWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    streams = all_streams(6)
    metrics = stream_named(streams, "metrics")
    writer = make_store(streams=streams)
    written = write_rows(writer, metrics, 0, 3)
    _fail_writes_with_enospc(monkeypatch, writer.path)
    writer.put(RowBlock("metrics", 3, fake_rows(metrics, 3, 2)))
    with pytest.raises(WriterError, match="rows committed before are kept"):
        writer.close("complete")
    monkeypatch.undo()
    reader = StoreReader(writer.path)
    assert reader.committed("metrics") == 3
    for path, values in written.items():
        np.testing.assert_array_equal(reader.array(path), values, err_msg=path)
    # The lock is free again: the run can be resumed.
    open_for_resume(writer.path).close("interrupted")


def test_put_blocks_when_the_queue_is_full_and_drops_nothing(
    make_store: Callable[..., StoreWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    streams = all_streams(12)
    params = stream_named(streams, "params")
    writer = make_store(streams=streams)
    gate = threading.Event()
    original = StoreWriter._write_and_commit

    def slow_write(self: StoreWriter, blocks: list[RowBlock]) -> None:
        gate.wait(WAIT_S)  # a writer stalled on a slow disk
        original(self, blocks)

    monkeypatch.setattr(StoreWriter, "_write_and_commit", slow_write)
    n = 12
    blocks = [fake_rows(params, row, 1) for row in range(n)]
    queued: list[int] = []

    def produce() -> None:
        for row, rows in enumerate(blocks):
            writer.put(RowBlock("params", row, rows))
            queued.append(row)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    producer.join(0.5)
    assert producer.is_alive(), "put never blocked although the writer was stalled"
    assert len(queued) < n
    assert StoreReader(writer.path).committed("params") == 0
    gate.set()
    producer.join(WAIT_S)
    assert not producer.is_alive()
    writer.close("complete")
    reader = StoreReader(writer.path)
    assert reader.committed("params") == n
    for path in blocks[0]:
        np.testing.assert_array_equal(reader.array(path), np.concatenate([b[path] for b in blocks]), err_msg=path)


@pytest.mark.parametrize("kind", ["missing", "plain-file", "empty-directory", "damaged-zarr-json"])
def test_reader_names_the_path_it_cannot_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "run.zarr"
    if kind == "plain-file":
        path.write_text("hello")
    elif kind == "empty-directory":
        path.mkdir()
    elif kind == "damaged-zarr-json":
        path.mkdir()
        (path / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match=re.escape(str(path))):
        StoreReader(path)
    with pytest.raises(StoreError, match=re.escape(str(path))):
        open_for_resume(path)


def test_reader_names_a_missing_array(make_store: Callable[..., StoreWriter]) -> None:
    writer = make_store()
    writer.close("complete")
    reader = StoreReader(writer.path)
    with pytest.raises(StoreError, match="no array params/nope"):
        reader.array("params/nope")
