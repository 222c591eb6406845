"""The writer's direct whole-row chunk path: taken for every whole-row array, and byte-identical to zarr's.

zarr's generic write costs ~1 ms of Python per chunk; the writer encodes a whole-row chunk itself with
the array's own codecs. A codec comparison that counted Blosc's `typesize` (which zarr fills in from
the dtype) once sent every float32 and int32 array (gradient moments, parameter snapshots) down the
slow path; these tests fail if any whole-row array goes there again, or if the bytes ever differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
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


def test_every_whole_row_array_takes_the_direct_path_with_zarrs_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    through_zarr: list[str] = []
    original = store_writer._write_rows

    async def spy(array: zarr.Array, parts: list[tuple[int, np.ndarray]]) -> None:
        through_zarr.append(array.path)
        await original(array, parts)

    monkeypatch.setattr(store_writer, "_write_rows", spy)
    stream = schema.grad_stream(3, 2, SHAPES)
    writer = create_store(tmp_path / "s.zarr", {"total_steps": 3}, [stream], {})
    writer.start()
    rng = np.random.default_rng(0)
    rows = [grad_row(step, rng) for step in range(3)]
    for i, row in enumerate(rows):
        writer.put(RowBlock(schema.GRAD.name, i, row))
    writer.close("complete")
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
