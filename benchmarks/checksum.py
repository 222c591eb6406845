"""What the crc32c chunk checksums of issue 12 cost: `record` time, and chunk write/read throughput.

Side by side in one process (machines are noisy; read the ratios):

- record: the quick start recorded with checksums (as shipped) and without (schema.zarr_codecs and
  the direct-path encoder patched to leave the crc32c out), alternately, `--repeats` times each;
- write: float32 rows of 1 MiB encoded (blosc-lz4) with and without the 4-byte crc32c suffix;
- read: the same rows read back through zarr with the crc32c codec (plus gentrace's own check in
  CheckedStore) and without.

Usage: python benchmarks/checksum.py [--repeats 5] [--mib 64]. Target: record with / without <= 1.05.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from gentrace.core import config
from gentrace.store import schema
from gentrace.store.integrity import CheckedStore, checked
from gentrace.training.run import record


@contextlib.contextmanager
def without_checksums() -> Iterator[None]:
    codecs, encode = schema.zarr_codecs, schema.ChunkEncoder.encode

    def no_crc(kind: str) -> list[Any]:
        return codecs(kind)[:-1]

    def encode_plain(self: schema.ChunkEncoder, values: np.ndarray) -> bytes:
        return bytes(self._codec.encode(values))

    schema.CODECS.update({kind: (lambda kind=kind: no_crc(kind)) for kind in schema.CODEC_PARAMS})
    schema.ChunkEncoder.encode = encode_plain  # type: ignore[method-assign]
    try:
        yield
    finally:
        schema.CODECS.update({kind: (lambda kind=kind: codecs(kind)) for kind in schema.CODEC_PARAMS})
        schema.ChunkEncoder.encode = encode  # type: ignore[method-assign]


def time_record(tmp: Path, checksums: bool, i: int) -> float:
    cfg = config.load(None, [])
    out = tmp / f"run-{checksums}-{i}.zarr"
    t0 = time.perf_counter()
    if checksums:
        record(cfg, out, device="cpu")
    else:
        with without_checksums():
            record(cfg, out, device="cpu")
    return time.perf_counter() - t0


def chunk_throughput(tmp: Path, rows: np.ndarray, checksums: bool, i: int) -> tuple[float, float]:
    """(encode MiB/s, read MiB/s) of `rows` (1 MiB each) with or without the crc32c."""
    mib = len(rows)
    ctx = contextlib.nullcontext() if checksums else without_checksums()
    with ctx:
        path = tmp / f"chunks-{checksums}-{i}.zarr"
        encoder = schema.ChunkEncoder("float")
        t0 = time.perf_counter()
        encoded = [encoder.encode(row) for row in rows]
        write_s = time.perf_counter() - t0
        zarr.create_array(
            str(path),
            shape=rows.shape,
            chunks=(1, rows.shape[1]),
            dtype="float32",
            compressors=schema.CODECS["float"](),
            chunk_key_encoding={"name": "default", "separator": "."},
        )
        for j, data in enumerate(encoded):
            (path / f"c.{j}.0").write_bytes(data)
        store = CheckedStore(path) if checksums else zarr.storage.LocalStore(path, read_only=True)
        reopened = checked(zarr.open_array(store, mode="r"))
        t0 = time.perf_counter()
        back = reopened[...]
        read_s = time.perf_counter() - t0
        assert np.array_equal(back, rows)
        shutil.rmtree(path)
    return mib / write_s, mib / read_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        time_record(tmp, True, -1)  # warm-up: imports, data set cache
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.repeats):
            for checksums in (False, True):
                times[checksums].append(time_record(tmp, checksums, i))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"record quick start: with crc32c {on:.2f} s, without {off:.2f} s (medians of {args.repeats})")
        print(f"  ratio with/without: {on / off:.3f}   (best/best {min(times[True]) / min(times[False]):.3f})")
        rows = np.random.default_rng(0).standard_normal((args.mib, 2**18)).astype(np.float32)
        chunk_throughput(tmp, rows, True, -1)  # warm-up: blosc threads, page cache
        speeds: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for i in range(args.repeats):
            for checksums in (False, True):
                speeds[checksums].append(chunk_throughput(tmp, rows, checksums, i))
        for label, k in (("encode 1 MiB rows", 0), ("read via zarr    ", 1)):
            on = statistics.median(s[k] for s in speeds[True])
            off = statistics.median(s[k] for s in speeds[False])
            print(f"{label}: with crc32c {on:.0f} MiB/s, without {off:.0f} MiB/s, time ratio {off / on:.3f}")


if __name__ == "__main__":
    main()
