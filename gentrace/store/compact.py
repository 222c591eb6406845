"""`gentrace compact`: rewrite a finished store's row-chunked arrays into multi-row shards.

A run writes one chunk file per row of its big streams (params, grad moments, predictions,
bitmasks), which is what makes it crash-safe, but leaves tens of thousands of small files: slow on
cluster file systems (Lustre, GPFS, NFS), where every file costs a metadata round trip. Compaction
rewrites each such array with zarr's sharding codec (zarr v3 `sharding_indexed`): the inner chunks
stay exactly the old chunks (same codec, same bytes per chunk), but up to `shard_bytes` of them
share one file. Any zarr v3 reader reads the result; analyses give identical output.

Crash safety, per array (the store is locked for the whole time, so no writer or second compaction
runs alongside):

    1. write the sharded copy to  <store>.compacting/new/<path>      (the store is untouched)
    2. rename <store>/<path>  ->  <store>.compacting/old/<path>
    3. rename <store>.compacting/new/<path>  ->  <store>/<path>
    4. delete <store>.compacting/old/<path>

An array missing from the store can only be between steps 2 and 3, and then its complete copy is
in `new/`; `_recover` puts it in place before anything else happens. Rows past a stream's committed
count (a killed run's torn rows, preallocated fill) are dropped. A compacted store is history: the
writer's direct whole-row chunk writes assume one file per row, so `--resume` refuses it.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from gentrace.core.errors import StoreError
from gentrace.store import rootmeta, schema
from gentrace.store.lock import StoreLock
from gentrace.store.reader import StoreReader, disk_usage

# Uncompressed bytes of one shard at most: big enough to cut file counts ~100x for typical rows,
# small enough that copying one shard at a time keeps memory bounded.
SHARD_TARGET_BYTES = 64 * 2**20
# Statuses of runs that `--resume` could still continue: compacting them ends that possibility.
# (A diverged run is not among them: resuming it from its last checkpoint diverges again.)
RESUMABLE = ("interrupted", "killed", "running", "initializing", "failed")


@dataclass
class CompactReport:
    """What one compaction did: arrays rewritten, files and bytes on disk before and after, seconds."""

    arrays: int
    files_before: int
    files_after: int
    bytes_before: int
    bytes_after: int
    seconds: float


def staging_dir(store: Path) -> Path:
    """The sibling directory a compaction stages its copies in (same file system: renames are atomic)."""
    return store.with_name(store.name + ".compacting")


def shard_shape(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int, shard_bytes: int) -> tuple[int, ...]:
    """Shard shape for an array of `shape` with inner `chunks`: whole rows, as many as fit `shard_bytes`.

    Every dimension after the first covers the whole row (rounded up to a multiple of the inner
    chunk, as the sharding codec requires); the row count is a multiple of the inner chunk's.
    """
    row = tuple(math.ceil(d / c) * c for d, c in zip(shape[1:], chunks[1:], strict=True))
    chunk_rows = chunks[0]
    block_bytes = chunk_rows * math.prod(row) * itemsize
    blocks = max(1, shard_bytes // max(1, block_bytes))
    blocks = min(blocks, max(1, math.ceil(shape[0] / chunk_rows)))
    return (blocks * chunk_rows, *row)


def compact(
    path: Path | str,
    *,
    shard_bytes: int = SHARD_TARGET_BYTES,
    final: bool = False,
    on_array: Callable[[str], None] | None = None,
) -> CompactReport:
    """Rewrite every streamed array of the store at `path` whose shards would hold several chunks.

    Args:
        path: a gentrace store no process is writing.
        shard_bytes: uncompressed bytes per shard at most.
        final: also compact an interrupted or killed run (it can then no longer be resumed).
        on_array: called with each array path once it is done (progress bars).
    """
    store = Path(path).resolve()  # `compact .` from inside the store: the staging sibling needs a name
    if shard_bytes < 1:
        raise StoreError(f"the shard size must be positive (got {shard_bytes} bytes)")
    reader = StoreReader(store, compacting_ok=True)
    status = reader.status  # before locking: our own lock would make a killed run look live
    lock = StoreLock(store)
    lock.acquire()  # refuses a store that a live run (or another compaction) holds
    try:
        resuming_compaction = bool(reader.attrs.get(schema.COMPACTING_ATTR))
        _recover(store, reader)
        if status in RESUMABLE and not final and not resuming_compaction:
            raise StoreError(
                f"{store} is a {status} run that `gentrace record --resume` can continue; compacting it "
                "ends that. Resume it first, or pass --final to compact it as it is"
            )
        # Set before any array changes: a store with it set refuses --resume and new readers until a
        # `gentrace compact` finishes the job (a half-sharded store must never get per-row writes).
        rootmeta.update_attrs(store, {schema.COMPACTING_ATTR: True})
        files_before, bytes_before = disk_usage(store)
        start = time.perf_counter()
        done = 0
        for stream, paths in reader.streams().items():
            rows = reader.committed(stream)
            for array_path in paths:
                if _compact_array(store, reader, array_path, rows, shard_bytes):
                    done += 1
                if on_array is not None:
                    on_array(array_path)
        shutil.rmtree(staging_dir(store), ignore_errors=True)
        previous = reader.attrs.get("compacted")
        arrays = done + (int(previous["arrays"]) if isinstance(previous, dict) else 0)
        compacted = {"shard_bytes": shard_bytes, "arrays": arrays}
        rootmeta.update_attrs(store, {"compacted": compacted, schema.COMPACTING_ATTR: False})
        files_after, bytes_after = disk_usage(store)
        return CompactReport(done, files_before, files_after, bytes_before, bytes_after, time.perf_counter() - start)
    finally:
        lock.release()


def array_count(path: Path | str) -> int:
    """How many streamed arrays a compaction of `path` walks over (the progress bar's total)."""
    return sum(len(paths) for paths in StoreReader(path, compacting_ok=True).streams().values())


def _compact_array(store: Path, reader: StoreReader, array_path: str, rows: int, shard_bytes: int) -> bool:
    """Steps 1-4 of the module docstring for one array; False when sharding would not merge chunks."""
    old = reader.lazy(array_path)
    if old.shards is not None or rows == 0:
        return False
    shape = (min(rows, int(old.shape[0])), *old.shape[1:])
    chunks = tuple(int(c) for c in old.chunks)
    shards = shard_shape(shape, chunks, np.dtype(old.dtype).itemsize, shard_bytes)
    if math.prod(s // c for s, c in zip(shards, chunks, strict=True)) <= 1:
        return False  # one chunk per shard: same file count, nothing gained
    staging = staging_dir(store)
    new_root = staging / "new"
    shutil.rmtree(new_root / array_path, ignore_errors=True)  # a copy a crash left half-written
    new = zarr.create_array(
        LocalStore(new_root),
        name=array_path,
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=old.dtype,
        compressors=list(old.compressors),
        fill_value=old.fill_value,
        attributes=dict(old.attrs),
        chunk_key_encoding={"name": "default", "separator": "."},
        zarr_format=3,
        config={"write_empty_chunks": True},  # every inner chunk present: a missing one is damage
    )
    for begin in range(0, shape[0], shards[0]):  # one shard at a time: memory stays ~shard_bytes
        end = min(shape[0], begin + shards[0])
        new[begin:end] = old[begin:end]
    parked = staging / "old" / array_path
    parked.parent.mkdir(parents=True, exist_ok=True)
    (store / array_path).rename(parked)
    (new_root / array_path).rename(store / array_path)
    shutil.rmtree(parked)
    return True


def _recover(store: Path, reader: StoreReader) -> None:
    """Finish the renames of a compaction killed between its steps 2 and 3 (see module docstring)."""
    staging = staging_dir(store)
    if not staging.exists():
        return
    for paths in reader.streams().values():
        for array_path in paths:
            target = store / array_path
            if (target / "zarr.json").exists():
                continue
            for candidate in (staging / "new" / array_path, staging / "old" / array_path):
                if (candidate / "zarr.json").exists():
                    shutil.rmtree(target, ignore_errors=True)
                    candidate.rename(target)
                    break
    shutil.rmtree(staging)
