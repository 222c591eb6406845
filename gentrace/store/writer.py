"""Background store writer and the commit protocol of SPEC section 3.

The training thread hands `RowBlock`s of host NumPy arrays to `StoreWriter.put`, which blocks
when the bounded queue is full (back-pressure, nothing dropped). One background thread owns
every zarr handle; for each block it writes all chunks, then the block's checkpoint file (if
any), and only then raises the stream's `committed` counter in the root attrs. zarr's local
store replaces files atomically, so after a SIGKILL every committed row is whole, and readers
(which slice to `committed`) never see a torn row. A writer exception is re-raised in the
training thread at the next `put` or at `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.core.sync import sync
from zarr.storage import LocalStore

from gentrace.errors import StoreError, WriterError
from gentrace.store import schema
from gentrace.store.lock import StoreLock
from gentrace.store.reader import check_gentrace_store

CHECKPOINT_DIR = schema.CHECKPOINT_GROUP


@dataclass
class RowBlock:
    """Rows `start .. start+k` of one stream: arrays maps path -> [k, *row_shape] host array.

    `checkpoint` (serialized training state taken at this block's step) is written before the
    commit, so a committed parameter snapshot always has its checkpoint on disk.
    """

    stream: str
    start: int
    arrays: dict[str, np.ndarray]
    checkpoint: bytes | None = None
    checkpoint_step: int = -1

    @property
    def rows(self) -> int:
        """How many rows the block holds (all arrays agree)."""
        return len(next(iter(self.arrays.values())))


@dataclass
class _Finish:
    status: str
    resize: bool


@dataclass
class WriterStats:
    """Writer bookkeeping reported by `gentrace info`."""

    busy_s: float = 0.0
    blocks: int = 0
    bytes: int = 0
    committed: dict[str, int] = field(default_factory=dict)


def now() -> str:
    """UTC timestamp in ISO format, for the `created`/`finished` attrs."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def create_store(
    path: Path,
    attrs: Mapping[str, Any],
    streams: Iterable[schema.StreamSpec],
    static: Mapping[str, np.ndarray],
    *,
    overwrite: bool = False,
) -> StoreWriter:
    """Create a new store at `path` (refusing an existing path unless `overwrite`), locked for writing."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise StoreError(f"{path} is a file, not a store directory; choose another --out path")
        if not overwrite:
            raise StoreError(f"{path} already exists; pass --overwrite to replace it or --resume to continue it")
        if any(path.iterdir()):
            check_gentrace_store(path)  # never delete a directory that is not one of ours
        lock = StoreLock(path)
        lock.acquire()
        lock.release()
        shutil.rmtree(path)
    path.mkdir(parents=True)
    lock = StoreLock(path)
    lock.acquire()
    try:
        # All attrs in the group's first write: a kill can never leave a bare, unclaimable zarr.json.
        root = zarr.open_group(
            LocalStore(path),
            mode="a",
            zarr_format=3,
            attributes={
                "writer_process": _process_name(),
                "format": schema.FORMAT_NAME,
                "schema_version": schema.SCHEMA_VERSION,
                **attrs,
                "status": "initializing",
                "created": now(),
                "committed": {},
            },
        )
        for name, values in static.items():
            spec = schema.ArraySpec(name, values.shape[1:], values.dtype.name, "index", max(1, len(values)))
            _create_array(root, spec, len(values))[...] = values
        writer = StoreWriter(root, lock, path)
        writer.declare(streams)
        root.attrs.update({"status": "running"})
    except BaseException:
        lock.release()
        raise
    return writer


def open_for_resume(path: Path) -> StoreWriter:
    """Open an existing store to continue it: lock it and delete partial files a kill left behind."""
    path = Path(path)
    attrs = check_gentrace_store(path)
    if attrs.get("compacted") or attrs.get(schema.COMPACTING_ATTR):
        raise StoreError(
            f"{path} was compacted by `gentrace compact` and can no longer be resumed; "
            "record a new run (or copy its config) instead"
        )
    lock = StoreLock(path)
    lock.acquire()
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)
    root = zarr.open_group(LocalStore(path), mode="r+", zarr_format=3)
    writer = StoreWriter(root, lock, path)
    root.attrs.update({"status": "running", "writer_process": _process_name()})
    return writer


async def _gather(writes: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*writes)


async def _write_rows(array: zarr.Array, parts: list[tuple[int, np.ndarray]]) -> None:
    """Write (start, rows) parts of one array one after another, merging contiguous runs."""
    runs: list[tuple[int, list[np.ndarray]]] = []
    for start, values in sorted(parts, key=lambda part: part[0]):
        if runs and runs[-1][0] + sum(len(v) for v in runs[-1][1]) == start:
            runs[-1][1].append(values)
        else:
            runs.append((start, [values]))
    for start, pieces in runs:
        values = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        await array.async_array.setitem(slice(start, start + len(values)), values)


def _process_name() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _array_kwargs(spec: schema.ArraySpec, rows: int) -> dict[str, Any]:
    return {
        "shape": (rows, *spec.row_shape),
        "chunks": spec.chunks(),
        "dtype": spec.dtype,
        "compressors": schema.CODECS[spec.codec](),
        "fill_value": spec.fill_value,
        "attributes": {**spec.attrs, "gentrace_codec": spec.codec},
        # "c.5.0.0" files rather than c/5/0/0 directories: one file per chunk, no directory tree to
        # create per row (zarr's default encoding with the "." separator; any zarr v3 reader follows it).
        "chunk_key_encoding": {"name": "default", "separator": "."},
        "overwrite": True,
    }


def _create_array(root: zarr.Group, spec: schema.ArraySpec, rows: int) -> zarr.Array:
    return root.create_array(spec.path, **_array_kwargs(spec, rows))


async def _create_arrays(store: LocalStore, specs: list[tuple[schema.ArraySpec, int]]) -> None:
    """Create many arrays concurrently (each costs a metadata write; a run has dozens)."""
    group = await zarr.api.asynchronous.open_group(store=store, mode="r+", zarr_format=3)
    parents = sorted({spec.path.rsplit("/", 1)[0] for spec, _ in specs if "/" in spec.path}, key=len)
    for parent in parents:  # parent groups first, shortest path first: no two writers of one zarr.json
        if not await group.contains(parent):
            await group.require_group(parent)
    await asyncio.gather(*[group.create_array(spec.path, **_array_kwargs(spec, rows)) for spec, rows in specs])


class StoreWriter:
    """Owns a store's zarr handles; writes `RowBlock`s on a background thread with a bounded queue."""

    def __init__(self, root: zarr.Group, lock: StoreLock, path: Path, queue_size: int = 2) -> None:
        self.root = root
        self.path = path
        self._lock = lock
        self._arrays: dict[str, zarr.Array] = {}
        attrs: dict[str, Any] = dict(root.attrs)
        self._streams: dict[str, list[str]] = dict(attrs.get("streams", {}))
        self.stats = WriterStats(committed=dict(attrs.get("committed", {})))
        previous = attrs.get("writer", {})
        self.stats.busy_s = float(previous.get("busy_s", 0.0))
        self.stats.bytes = int(previous.get("bytes", 0))
        self._queue: queue.Queue[RowBlock | _Finish | None] = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._direct: dict[str, str | None] = {}
        # Blosc and file writes release the GIL: two threads overlap encoding with I/O.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gentrace-chunks")

    # -- set-up, on the calling thread before `start` -------------------------------------------
    def declare(self, streams: Iterable[schema.StreamSpec]) -> None:
        """Create (or grow to their preallocated length) the arrays of each stream."""
        new: list[tuple[schema.ArraySpec, int]] = []
        for stream in streams:
            self._streams[stream.name] = [spec.path for spec in stream.arrays]
            self.stats.committed.setdefault(stream.name, 0)
            for spec in stream.arrays:
                if spec.path in self.root:
                    array = self._array(spec.path)
                    if array.shape[0] < stream.rows:
                        array.resize((stream.rows, *array.shape[1:]))
                else:
                    new.append((spec, stream.rows))
        if new:
            store = self.root.store
            assert isinstance(store, LocalStore)
            sync(_create_arrays(store, new))
        self.root.attrs.update({"streams": self._streams, "committed": self.stats.committed})

    def truncate(self, stream: str, rows: int) -> None:
        """Forget rows >= `rows` of a stream (resume keeps only rows up to the checkpoint)."""
        keep = self.stats.committed[stream] = min(rows, self.stats.committed.get(stream, 0))
        for path in self._streams.get(stream, []):
            array = self._array(path)
            # resize drops whole chunks only: cut rows sharing the last kept chunk become fill values,
            # so a plain zarr reader never mistakes them for data when the array regrows.
            end = min(array.shape[0], -(-keep // array.chunks[0]) * array.chunks[0])
            if end > keep:
                array[keep:end] = array.fill_value
            array.resize((keep, *array.shape[1:]))
            self._arrays.pop(path)
        self.root.attrs.update({"committed": self.stats.committed})

    def start(self) -> None:
        """Start the background thread; from now on only it touches zarr."""
        self._thread = threading.Thread(target=self._run, name="gentrace-writer", daemon=True)
        self._thread.start()

    # -- training thread API --------------------------------------------------------------------
    def put(self, block: RowBlock) -> None:
        """Queue a block; blocks while the queue is full; re-raises a writer failure."""
        self._enqueue(block)

    def close(self, status: str) -> None:
        """Write everything queued, set `status` (resizing arrays to committed on `complete`), release."""
        try:
            if self._thread is not None and self._thread.is_alive():
                # The thread drains the queue even after a failure, so these puts never hang.
                self._enqueue(_Finish(status, resize=status == "complete"), check=False)
                self._enqueue(None, check=False)
                self._thread.join()
            elif self._error is None:
                self._finish(_Finish(status, resize=status == "complete"))
            if self._error is not None:
                self._mark_failed()
            self._raise_if_failed()
        finally:
            self._pool.shutdown(wait=True)
            self._lock.release()

    def _mark_failed(self) -> None:
        # The disk may be full: then the status stays as it was, and the committed counters still hold.
        with contextlib.suppress(Exception):
            self.root.attrs.update({"status": "failed", "finished": now()})

    def close_after_failure(self, status: str) -> None:
        """Best-effort close when training already failed: keep what is committed, never mask the error."""
        try:
            self.close(status)
        except WriterError:
            self._lock.release()

    def _enqueue(self, item: RowBlock | _Finish | None, check: bool = True) -> None:
        while True:
            if check:
                self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            detail = f"{error.strerror}: {error.filename}" if isinstance(error, OSError) else repr(error)
            raise WriterError(f"writing the store {self.path} failed ({detail}); rows committed before are kept")

    # -- background thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            # Drain what else is queued: all its rows are written in one concurrent zarr call,
            # then committed with one attrs update (each zarr round trip costs ~1-5 ms).
            while items[-1] is not None and not self._queue.empty():
                items.append(self._queue.get_nowait())
            pending: list[RowBlock] = []
            for item in items:
                if item is None or self._error is not None:
                    continue  # on error, drain: the training thread sees it at its next put
                try:
                    if isinstance(item, _Finish):
                        self._write_and_commit(pending)
                        self._finish(item)
                    else:
                        pending.append(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                    self._error = exc
            if self._error is None:
                try:
                    self._write_and_commit(pending)
                except BaseException as exc:  # noqa: BLE001
                    self._error = exc
            if items[-1] is None:
                return

    def _write_and_commit(self, blocks: list[RowBlock]) -> None:
        """Write every chunk of `blocks` (concurrently), their checkpoints, then raise the counters."""
        if not blocks:
            return
        t0 = time.perf_counter()
        parts: dict[str, list[tuple[int, np.ndarray]]] = {}
        for block in blocks:
            stop = block.start + block.rows
            for path, values in block.arrays.items():
                array = self._array(path)
                if array.shape[0] < stop:
                    grown = max(stop, array.shape[0] + schema.GROW_ROWS)
                    array.resize((grown, *array.shape[1:]))
                    self._arrays.pop(path)
                parts.setdefault(path, []).append((block.start, values))
                self.stats.bytes += values.nbytes
        direct = {path: rows for path, rows in parts.items() if self._row_chunks(path)}
        # Arrays are written concurrently; the rows of one array in order, contiguous ones merged,
        # because two writes into one chunk would each rewrite it and the last would win.
        zarr_parts = [_write_rows(self._array(path), rows) for path, rows in parts.items() if path not in direct]
        futures = [
            self._pool.submit(self._write_chunk, path, start + i, values[i])
            for path, rows in direct.items()
            for start, values in rows
            for i in range(len(values))
        ]
        if zarr_parts:
            sync(_gather(zarr_parts))
        for future in futures:
            future.result()
        for block in blocks:
            if block.checkpoint is not None:
                self._write_checkpoint(block.checkpoint, block.checkpoint_step)
        self.stats.blocks += len(blocks)
        self.stats.busy_s += time.perf_counter() - t0
        self._commit_written(blocks)

    def _commit_written(self, blocks: list[RowBlock]) -> None:
        """Raise the committed counters of fully written blocks (one attrs write), then prune checkpoints."""
        if not blocks:
            return
        t0 = time.perf_counter()
        for block in blocks:
            stop = block.start + block.rows
            self.stats.committed[block.stream] = max(stop, self.stats.committed.get(block.stream, 0))
        self._commit()
        checkpoints = [b.checkpoint_step for b in blocks if b.checkpoint is not None]
        if checkpoints:
            self.prune_checkpoints(keep_step=checkpoints[-1])
        blocks.clear()
        self.stats.busy_s += time.perf_counter() - t0

    def _commit(self) -> None:
        # The root zarr.json is replaced atomically: either the old or the new counters are visible.
        self.root.attrs.update(
            {
                "committed": self.stats.committed,
                "writer": {
                    "busy_s": round(self.stats.busy_s, 4),
                    "blocks": self.stats.blocks,
                    "bytes": self.stats.bytes,
                },
            }
        )

    def _finish(self, item: _Finish) -> None:
        if item.resize:
            for stream, paths in self._streams.items():
                rows = self.stats.committed.get(stream, 0)
                for path in paths:
                    array = self._array(path)
                    if array.shape[0] != rows:
                        array.resize((rows, *array.shape[1:]))
        self._commit()
        self.root.attrs.update({"status": item.status, "finished": now()})

    def _row_chunks(self, path: str) -> str | None:
        """The codec of an array whose chunks are whole rows (the direct path), else None.

        zarr's generic write costs ~1 ms per chunk in Python (codec pipeline, event loop hops);
        a whole-row chunk needs none of it: encode the row with the array's own codec and write
        the chunk file. Those chunks are never rewritten once committed, and a chunk torn by a
        kill belongs to an uncommitted row, which resume deletes, so no temporary file is needed.
        """
        if path not in self._direct:
            array = self._array(path)
            codec = array.attrs.get("gentrace_codec")
            whole = array.chunks[0] == 1 and tuple(array.chunks[1:]) == tuple(array.shape[1:])
            self._direct[path] = str(codec) if whole and codec in schema.CHUNK_ENCODERS else None
        return self._direct[path]

    def _write_chunk(self, path: str, row: int, values: np.ndarray) -> None:
        array = self._array(path)
        codec = self._direct[path]
        assert codec is not None
        key = array.metadata.encode_chunk_key((row,) + (0,) * (array.ndim - 1))
        target = self.path / path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.dtype(array.dtype).newbyteorder("<")
        encoded = schema.CHUNK_ENCODERS[codec]().encode(np.ascontiguousarray(values, dtype=dtype))
        target.write_bytes(encoded)

    def _write_checkpoint(self, payload: bytes, step: int) -> None:
        # A plain uint8 array (one chunk) keeps the store pure Zarr; it is complete before the commit.
        values = np.frombuffer(payload, dtype=np.uint8)
        spec = schema.checkpoint_array(step, len(values))
        _create_array(self.root, spec, len(values))[...] = values

    def prune_checkpoints(self, keep_step: int) -> None:
        """Delete every checkpoint but the one at `keep_step` (only the latest committed one is needed)."""
        if CHECKPOINT_DIR not in self.root:
            return
        group = self.root[CHECKPOINT_DIR]
        assert isinstance(group, zarr.Group)
        for name in list(group.array_keys()):
            if name != schema.checkpoint_name(keep_step):
                del group[name]

    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            array = self.root[path]
            assert isinstance(array, zarr.Array)
            self._arrays[path] = array
        return self._arrays[path]
