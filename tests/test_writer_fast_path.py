"""The writer's direct whole-row chunk path: taken for every whole-row array, and byte-identical to zarr's.

zarr's generic write costs ~1 ms of Python per chunk; the writer encodes a whole-row chunk itself with
the array's own codecs. A codec comparison that counted Blosc's `typesize` (which zarr fills in from
the dtype) once sent every float32 and int32 array (gradient moments, parameter snapshots) down the
slow path; these tests fail if any whole-row array goes there again, or if the bytes ever differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from gentrace.store import schema
from gentrace.store import writer as store_writer
from gentrace.store.reader import StoreReader
from gentrace.store.writer import RowBlock, create_store

SHAPES = {"0.weight": (6, 5), "0.bias": (6,)}


def grad_row(step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    row = {
        schema.GRAD.step: np.array([step], np.int64),
        schema.GRAD.n: np.full((1, 2), 7, np.int64),
        schema.GRAD.loss_sum: np.ones((1, 2)),
    }
    for tensor, shape in SHAPES.items():
        for moment in schema.GRAD.MOMENTS:
            dtype = np.float32 if moment in schema.GRAD.FLOAT_MOMENTS else np.int32
            row[schema.GRAD.moment(tensor, moment)] = (rng.standard_normal((1, 2, *shape)) * 50).astype(dtype)
    return row


def write_grad_rows(writer: store_writer.StoreWriter, seed: int, count: int = 3) -> list[dict[str, np.ndarray]]:
    """Start `writer`, hand it `count` grad rows one block each, close it `complete`; returns the rows."""
    writer.start()
    rng = np.random.default_rng(seed)
    rows = [grad_row(step, rng) for step in range(count)]
    for i, row in enumerate(rows):
        writer.put(RowBlock(schema.GRAD.name, i, row))
    writer.close("complete")
    return rows


def spy_on_zarrs_write(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the arrays the writer hands to zarr's generic write, as they are written."""
    through_zarr: list[str] = []
    original = store_writer._write_rows

    async def spy(array: zarr.Array, parts: list[tuple[int, np.ndarray]]) -> None:
        through_zarr.append(array.path)
        await original(array, parts)

    monkeypatch.setattr(store_writer, "_write_rows", spy)
    return through_zarr


def test_every_whole_row_array_takes_the_direct_path_with_zarrs_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    through_zarr = spy_on_zarrs_write(monkeypatch)
    stream = schema.grad_stream(3, 2, SHAPES)
    writer = create_store(tmp_path / "s.zarr", {"total_steps": 3}, [stream], {})
    rows = write_grad_rows(writer, seed=0)
    assert through_zarr == []  # every grad array is whole-row chunks: none went through zarr
    # the same rows written by zarr itself into an array of the same metadata: the same chunk files
    reference = zarr.open_group(LocalStore(tmp_path / "ref.zarr"), mode="w", zarr_format=3)
    reader = StoreReader(tmp_path / "s.zarr")
    for spec in stream.arrays:
        kwargs = store_writer._array_kwargs(spec, 3)
        array = reference.create_array(spec.path, **kwargs)
        array[...] = np.concatenate([row[spec.path] for row in rows])
        written = sorted(p.name for p in (tmp_path / "s.zarr" / spec.path).iterdir() if p.name != "zarr.json")
        assert written, spec.path
        for name in written:
            mine = (tmp_path / "s.zarr" / spec.path / name).read_bytes()
            assert mine == (tmp_path / "ref.zarr" / spec.path / name).read_bytes(), f"{spec.path}/{name}"
        np.testing.assert_array_equal(reader.array(spec.path), np.concatenate([row[spec.path] for row in rows]))


def test_the_layout_read_from_zarr_json_is_zarrs_own_view_of_every_array(tmp_path: Path) -> None:
    """The direct path reads shape, chunks, dtype, fill value and chunk keys from `zarr.json` itself."""
    streams = [
        schema.grad_stream(5, 2, SHAPES),
        schema.tensor_stream(schema.PARAMS, 5, 2, {"0.weight": (6, 5), "0.bias": (6,)}),
    ]
    static = {schema.DATA.labels_test: np.arange(30) % 10, schema.DATA.noise_mask: np.zeros((2, 50), bool)}
    writer = create_store(tmp_path / "s.zarr", {"total_steps": 5}, streams, static)
    writer.close("complete")
    documents = sorted((tmp_path / "s.zarr").rglob("*/zarr.json"))  # the root's is the group's
    arrays = 0
    for document in documents:
        path = document.parent.relative_to(tmp_path / "s.zarr").as_posix()
        node = zarr.open(LocalStore(tmp_path / "s.zarr"), path=path, mode="r", zarr_format=3)
        if not isinstance(node, zarr.Array):
            continue
        arrays += 1
        layout = store_writer._layout(json.loads(document.read_text()))
        assert layout.shape == node.shape, path
        assert layout.chunks == node.chunks, path
        assert layout.dtype == node.dtype, path
        assert np.array_equal(np.array(layout.fill_value, node.dtype), np.array(node.fill_value), equal_nan=True), path
        assert layout.codec == node.attrs["gentrace_codec"], path  # every schema array takes the direct path
        assert layout.key(3) == node.metadata.encode_chunk_key((3,) + (0,) * (node.ndim - 1)), path
    assert arrays == sum(len(s.arrays) for s in streams) + len(static)


def test_an_array_with_other_codecs_goes_through_zarr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written with other codecs (an older schema) is resumed through zarr's own write, never miswritten."""
    through_zarr = spy_on_zarrs_write(monkeypatch)
    stream = schema.grad_stream(3, 2, SHAPES)
    writer = create_store(tmp_path / "s.zarr", {"total_steps": 3}, [stream], {})
    writer.close("running")
    other = next(spec for spec in stream.arrays if spec.dtype == "float32")
    kwargs = {**store_writer._array_kwargs(other, 3), "compressors": [ZstdCodec(level=1)]}  # no crc32c
    zarr.open_group(LocalStore(tmp_path / "s.zarr"), mode="r+", zarr_format=3).create_array(other.path, **kwargs)
    writer = store_writer.open_for_resume(tmp_path / "s.zarr")
    writer.declare([stream])
    rows = write_grad_rows(writer, seed=1)
    assert set(through_zarr) == {other.path}
    reader = StoreReader(tmp_path / "s.zarr")
    for spec in stream.arrays:
        np.testing.assert_array_equal(reader.array(spec.path), np.concatenate([row[spec.path] for row in rows]))
