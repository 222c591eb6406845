"""Chunks of several rows: the writer holds an array's last chunk in memory and writes it once it is full.

A file costs ~0.4 ms of kernel time to create on these machines, so one chunk file per recorded row of a
bias made the quick start's writer mostly file creation (issue 16). Per-row arrays now pack rows up to
~1 MiB a chunk, and the rows of a chunk that is not yet full wait in the writer's memory (its tail)
until the chunk fills, a checkpoint row, a barrier (`wait`) or the finish comes, or the writer idles.
What must hold is what held with one row per chunk: the bytes are zarr's, a committed row is on disk
(rows in a tail are not counted), a chunk that holds committed rows is replaced atomically, a resume
inside a chunk keeps the rows before the cut, and a failure never damages committed rows.
"""

from __future__ import annotations

import errno
import pathlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from gentrace.core.errors import WriterError
from gentrace.store import schema
from gentrace.store import writer as store_writer
from gentrace.store.reader import StoreReader
from gentrace.store.verify import verify
from gentrace.store.writer import RowBlock, create_store, open_for_resume

SHAPES = {"0.weight": (6, 5), "0.bias": (6,)}
ROWS = 10


def grad_rows(start: int, count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(start)
    rows = {
        schema.GRAD.step: np.arange(start, start + count, dtype=np.int64),
        schema.GRAD.n: np.full((count, 2), 7, np.int64),
        schema.GRAD.loss_sum: rng.standard_normal((count, 2)),
    }
    for tensor, shape in SHAPES.items():
        for moment in schema.GRAD.MOMENTS:
            dtype = np.float32 if moment in schema.GRAD.FLOAT_MOMENTS else np.int32
            rows[schema.GRAD.moment(tensor, moment)] = (rng.standard_normal((count, 2, *shape)) * 50).astype(dtype)
    return rows


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {path: np.concatenate([part[path] for part in parts]) for path in parts[0]}


def assert_zarrs_bytes(
    store: Path, reference_dir: Path, stream: schema.StreamSpec, rows: dict[str, np.ndarray]
) -> None:
    """Every chunk file of `store` equals the one zarr writes for the same rows into the same metadata."""
    reference = zarr.open_group(LocalStore(reference_dir), mode="w", zarr_format=3)
    for spec in stream.arrays:
        array = reference.create_array(spec.path, **store_writer._array_kwargs(spec, len(rows[spec.path])))
        array[...] = rows[spec.path]
        mine = sorted(p.name for p in (store / spec.path).iterdir() if p.name != "zarr.json")
        theirs = sorted(p.name for p in (reference_dir / spec.path).iterdir() if p.name != "zarr.json")
        assert mine == theirs, spec.path
        for name in mine:
            assert (store / spec.path / name).read_bytes() == (reference_dir / spec.path / name).read_bytes(), name


def started(path: Path, *streams: schema.StreamSpec, rows: int = ROWS) -> store_writer.StoreWriter:
    """A new store at `path` for `streams` (default: the grad stream of SHAPES), its writer started."""
    writer = create_store(path, {"total_steps": rows}, list(streams) or [schema.grad_stream(rows, 2, SHAPES)], {})
    writer.start()
    return writer


def test_per_row_arrays_pack_several_rows_per_chunk() -> None:
    stream = schema.grad_stream(ROWS, 2, SHAPES)
    assert all(spec.chunks()[0] == ROWS for spec in stream.arrays)  # ~240 B rows: the whole run in one chunk
    wide = schema.grad_stream(ROWS, 2, {"w": (512, 256)}).arrays[-1]  # a 1 MiB row: a chunk of its own
    assert wide.chunks()[0] == 1


def test_rows_written_over_many_commits_are_zarrs_bytes_and_no_partial_file_is_left(tmp_path: Path) -> None:
    stream = schema.grad_stream(ROWS, 2, SHAPES)
    writer = started(tmp_path / "s.zarr", stream)
    parts = []
    for start, count in ((0, 1), (1, 3), (4, 1), (5, 2), (7, 3)):  # every barrier rewrites the one chunk
        parts.append(grad_rows(start, count))
        writer.put(RowBlock(schema.GRAD.name, start, parts[-1]))
        writer.wait()
        assert StoreReader(writer.path).committed(schema.GRAD.name) == start + count
    writer.close("complete")
    rows = concat(parts)
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
    assert_zarrs_bytes(tmp_path / "s.zarr", tmp_path / "ref.zarr", stream, rows)
    reader = StoreReader(tmp_path / "s.zarr")
    for path, values in rows.items():
        np.testing.assert_array_equal(reader.array(path), values, err_msg=path)
    assert all(report.sound for report in verify(tmp_path / "s.zarr"))


def test_rows_in_a_tail_are_not_committed_until_they_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_writer, "IDLE_FLUSH_S", 3600.0)  # only the barrier writes the tail here
    stream = schema.grad_stream(ROWS, 2, SHAPES)
    writer = create_store(tmp_path / "s.zarr", {"total_steps": ROWS}, [stream], {})
    handled = threading.Event()
    commit_written = store_writer.StoreWriter._commit_written

    def note(self: store_writer.StoreWriter, blocks: list[RowBlock]) -> None:
        commit_written(self, blocks)
        handled.set()

    monkeypatch.setattr(store_writer.StoreWriter, "_commit_written", note)
    writer.start()
    writer.put(RowBlock(schema.GRAD.name, 0, grad_rows(0, 2)))
    assert handled.wait(20)  # the writer has taken the rows: they sit in its tails, not on disk
    assert StoreReader(tmp_path / "s.zarr").committed(schema.GRAD.name) == 0
    assert not [p for p in (tmp_path / "s.zarr" / schema.GRAD.step).iterdir() if p.name != "zarr.json"]
    writer.wait()
    assert StoreReader(tmp_path / "s.zarr").committed(schema.GRAD.name) == 2
    writer.close("complete")


def test_a_checkpoint_row_commits_the_rows_every_stream_handed_over_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grad = schema.grad_stream(ROWS, 2, SHAPES)
    params = schema.tensor_stream("params", ROWS, 2, SHAPES)
    writer = create_store(tmp_path / "s.zarr", {"total_steps": ROWS}, [grad, params], {})
    committed_at_checkpoint: list[dict[str, int]] = []
    commit = store_writer.StoreWriter._commit

    def spy(self: store_writer.StoreWriter) -> None:
        if self._checkpoint_step == 3:
            committed_at_checkpoint.append(dict(self.stats.committed))
        commit(self)

    monkeypatch.setattr(store_writer, "IDLE_FLUSH_S", 3600.0)  # only the checkpoint row writes the tails
    monkeypatch.setattr(store_writer.StoreWriter, "_commit", spy)
    writer.start()
    writer.put(RowBlock(schema.GRAD.name, 0, grad_rows(0, 3)))
    row = {schema.PARAMS.step: np.array([3], np.int64)}
    row |= {schema.PARAMS.tensor(p): np.ones((1, 2, *s), np.float32) for p, s in SHAPES.items()}
    writer.put(RowBlock(schema.PARAMS.name, 0, row, checkpoint=b"state", checkpoint_step=3))
    writer.close("complete")
    # the commit that names checkpoint 3 already counts the grad rows of steps 0..2: a resume from it
    # continues every stream from the same step
    assert committed_at_checkpoint
    assert committed_at_checkpoint[0][schema.GRAD.name] == 3
    assert committed_at_checkpoint[0][schema.PARAMS.name] == 1


def test_an_idle_writer_writes_its_tails(tmp_path: Path) -> None:
    writer = started(tmp_path / "s.zarr")
    writer.put(RowBlock(schema.GRAD.name, 0, grad_rows(0, 2)))
    reader = StoreReader(tmp_path / "s.zarr")
    deadline = time.monotonic() + 20  # waits for the counter, not for a guessed duration
    while reader.committed(schema.GRAD.name) < 2:
        assert time.monotonic() < deadline, "the idle writer never wrote its tail"
        time.sleep(0.01)
    writer.close("complete")


def test_resume_inside_a_chunk_keeps_the_rows_before_the_cut(tmp_path: Path) -> None:
    stream = schema.grad_stream(ROWS, 2, SHAPES)
    path = tmp_path / "s.zarr"
    writer = started(path, stream)
    first = grad_rows(0, 5)
    writer.put(RowBlock(schema.GRAD.name, 0, first))
    writer.close("interrupted")
    resumed = open_for_resume(path)
    resumed.declare([stream])
    resumed.truncate({schema.GRAD.name: 3})  # the checkpoint was at row 3: rows 3, 4 are recomputed
    resumed.start()
    rest = grad_rows(3, ROWS - 3)
    resumed.put(RowBlock(schema.GRAD.name, 3, rest))
    resumed.close("complete")
    rows = {p: np.concatenate([first[p][:3], rest[p]]) for p in first}
    assert_zarrs_bytes(path, tmp_path / "ref.zarr", stream, rows)
    reader = StoreReader(path)
    for name, values in rows.items():
        np.testing.assert_array_equal(reader.array(name), values, err_msg=name)


def test_a_failed_rewrite_leaves_the_committed_rows_of_its_chunk_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.zarr"
    writer = started(path)
    first = grad_rows(0, 4)
    writer.put(RowBlock(schema.GRAD.name, 0, first))
    writer.wait()
    write_bytes = pathlib.Path.write_bytes

    def full_disk(self: pathlib.Path, data: bytes) -> int:  # type: ignore[override]
        if self.name.endswith(".partial"):
            write_bytes(self, bytes(data)[: len(data) // 2])  # the disk filled up halfway through
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    writer.put(RowBlock(schema.GRAD.name, 4, grad_rows(4, 2)))
    with pytest.raises(WriterError, match="disk is full"):
        writer.wait()
    with pytest.raises(WriterError):
        writer.close("complete")
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    reader = StoreReader(path)
    assert reader.committed(schema.GRAD.name) == 4
    for name, values in first.items():
        np.testing.assert_array_equal(reader.array(name), values, err_msg=name)
    assert not list(path.rglob("*.partial"))
    assert all(report.sound for report in verify(path))


def run_and_count_chunk_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int) -> int:
    writes: list[str] = []
    original: Callable[..., float] = store_writer.StoreWriter._write_chunk

    def counting(self: store_writer.StoreWriter, path: str, *args: object) -> float:
        writes.append(path)
        return original(self, path, *args)

    monkeypatch.setattr(store_writer.StoreWriter, "_write_chunk", counting)
    writer = started(tmp_path / f"s{rows}.zarr", rows=rows)
    for row in range(rows):
        writer.put(RowBlock(schema.GRAD.name, row, grad_rows(row, 1)))
    writer.close("complete")
    return len(writes)


def test_a_chunk_is_written_about_once_not_once_per_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = schema.grad_stream(ROWS, 2, SHAPES)
    writes = run_and_count_chunk_writes(tmp_path, monkeypatch, ROWS)
    # one row per chunk wrote ROWS files per array; the tails write each chunk once, or a few times
    # when the writer idles between puts on a loaded machine
    assert writes < len(stream.arrays) * ROWS / 2


def test_static_arrays_are_written_with_zarrs_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    static = schema.data_arrays(
        train_index=np.arange(2 * 50).reshape(2, 50),
        test_index=np.arange(30),
        labels_train=rng.integers(0, 10, (2, 50)),
        labels_test=rng.integers(0, 10, 30),
        noise_mask=rng.random((2, 50)) < 0.3,
    )
    # record.inputs: 700 samples of 12 KiB in chunks of 341 (at most 4 MiB), the last chunk partly filled
    static |= {schema.DATA.x_test: rng.standard_normal((700, 3, 32, 32)).astype(np.float32)}
    writer = create_store(tmp_path / "s.zarr", {}, [], static)
    writer.close("complete")
    reference = zarr.open_group(LocalStore(tmp_path / "ref.zarr"), mode="w", zarr_format=3)
    reader = StoreReader(tmp_path / "s.zarr")
    for name, values in static.items():
        spec = schema.static_array(name, values)
        reference.create_array(name, **store_writer._array_kwargs(spec, len(values)))[...] = values
        mine = sorted(p.name for p in (tmp_path / "s.zarr" / name).iterdir() if p.name != "zarr.json")
        assert mine == sorted(p.name for p in (tmp_path / "ref.zarr" / name).iterdir() if p.name != "zarr.json")
        assert len(mine) == (3 if name == schema.DATA.x_test else 1), name
        for chunk in mine:
            assert (tmp_path / "s.zarr" / name / chunk).read_bytes() == (
                tmp_path / "ref.zarr" / name / chunk
            ).read_bytes()
        np.testing.assert_array_equal(reader.array(name), values, err_msg=name)
