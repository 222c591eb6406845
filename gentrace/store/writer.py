"""Background store writer and the commit protocol of SPEC section 3.

The training thread hands `RowBlock`s of host NumPy arrays to `StoreWriter.put`, which blocks
when the bounded queue is full (back-pressure, nothing dropped). One background thread owns
every zarr handle; for each block it writes all chunks, then the block's checkpoint file (if
any), and only then raises the stream's `committed` counter in the root attrs. Rows of an array
with several rows per chunk wait in memory (the array's tail) until their chunk is written
(`StoreWriter._place`); `committed` counts only rows whose every chunk is on disk. A chunk that
holds committed rows is replaced atomically (a `.partial` file renamed over it), so after a
SIGKILL every committed row is whole, and readers (which slice to `committed`) never see a torn
row. A writer exception is re-raised in the training thread at the next `put` or at `close`.

Every multi-step operation is ordered so that a kill at any point leaves the committed rows whole
and repeating the operation finishes it: a state change (status, counters, checkpoint step) is
one atomic rewrite of the root `zarr.json` (gentrace.store.rootmeta); resume's truncation lowers
`committed` before it deletes anything; a shrinking resize writes the array's new metadata before
it deletes the chunk files past it. Every chunk carries a crc32c checksum (schema.zarr_codecs) and
every chunk of the committed rows exists, so a reader can tell damage from data.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import math
import os
import queue
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.core.array import AsyncArray
from zarr.core.array_spec import ArrayConfig
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore, StorePath

from gentrace.core.errors import StoreError, WriterError
from gentrace.store import rootmeta, schema
from gentrace.store.lock import StoreLock
from gentrace.store.reader import check_gentrace_store, disk_usage

CHECKPOINT_DIR = schema.CHECKPOINT_GROUP
# Every chunk is written, even one that holds only fill values: a missing chunk is then always damage.
# Rows handed over within this window (or until this many bytes) are written and committed together.
COMMIT_EVERY_S = 0.5
COMMIT_BYTES = 64 * 2**20
# Rows of an array with several rows per chunk wait in memory until their chunk is full, a checkpoint
# row, a barrier or the finish comes, the oldest of them was handed over FLUSH_EVERY_S ago, or the
# writer has been idle IDLE_FLUSH_S (a run between epochs, a user's loop that paused).
FLUSH_EVERY_S = 5.0
IDLE_FLUSH_S = 0.5
WRITE_CONFIG = ArrayConfig(order="C", write_empty_chunks=True)
CHUNK_FILE = re.compile(r"^c\.(\d+)(\.\d+)*$")


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
    final_status: Callable[[str], str] | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Barrier:
    """Set once every block queued before it is committed (or the writer has failed)."""

    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Tail:
    """The last, unfilled chunk of an array with several rows per chunk, held by the writer.

    `rows` is the whole chunk (fill values where no row is yet); rows `on_disk .. end` are not yet in
    its chunk file. `since`: when the first of those was handed over.
    """

    index: int
    rows: np.ndarray
    end: int
    on_disk: int
    since: float


@dataclass(frozen=True)
class _Layout:
    """What the direct chunk path needs of an array, read from its `zarr.json` (no zarr objects).

    `codec`: the schema codec its chunks are written with when they hold whole rows and the array's
    codecs are the ones the schema writes today (crc32c included); None: chunks go through zarr.
    """

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    codec: str | None
    separator: str

    def key(self, index: int) -> str:
        """The chunk file holding chunk `index` along the rows (the whole row: index 0 on every other axis)."""
        return self.separator.join(["c", str(index), *["0"] * (len(self.shape) - 1)])


@dataclass
class WriterStats:
    """Writer bookkeeping reported by `gentrace info`.

    `busy_s`: wall seconds the writer spent writing and committing (on a machine whose cores training
    keeps busy, this includes waiting for a core); `cpu_s`: CPU seconds the writer thread and its
    chunk-writing threads used for it, what the writer costs a training loop that shares the cores
    (zarr's own write, taken only by arrays with other codecs, runs on zarr's threads, not counted).
    """

    busy_s: float = 0.0
    cpu_s: float = 0.0
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
    """Create a new store at `path` (refusing an existing path unless `overwrite`), locked for writing.

    The root `zarr.json` is written first, whole, with status `initializing`: a kill at any later
    point leaves a store that `--resume` recognizes and starts again from step 0. Replacing an
    existing store marks it `initializing` before anything of it is deleted.
    """
    path = Path(path)
    lock = StoreLock(path)
    try:
        if path.exists():
            if not path.is_dir():
                raise StoreError(f"{path} is a file, not a store directory; choose another --out path")
            if not overwrite:
                raise StoreError(f"{path} already exists; pass --overwrite to replace it or --resume to continue it")
            if any(path.iterdir()):
                check_gentrace_store(path)  # never delete a directory that is not one of ours
            lock.acquire()
            _clear(path)
        else:
            path.mkdir(parents=True)
            lock.acquire()
    except OSError as exc:
        lock.release()
        raise _os_error(exc, f"cannot create the store {path}", path) from None
    with _released_on_failure(lock, f"creating the store {path} failed", path):
        rootmeta.write(
            path,
            {
                "zarr_format": 3,
                "node_type": "group",
                "attributes": {
                    "writer_process": _process_name(),
                    "format": schema.FORMAT_NAME,
                    "schema_version": schema.SCHEMA_VERSION,
                    **attrs,
                    "status": "initializing",
                    "created": now(),
                    "committed": {},
                },
            },
        )
        root = zarr.open_group(LocalStore(path), mode="r+", zarr_format=3)
        specs = {name: schema.static_array(name, values) for name, values in static.items()}
        _create_arrays(path, [(spec, len(static[name])) for name, spec in specs.items()])
        for name, spec in specs.items():
            _write_static(path, root, spec, static[name])
        writer = StoreWriter(root, lock, path)
        writer.declare(streams)
        writer.write_attrs({"status": "running"})
    return writer


@contextlib.contextmanager
def _released_on_failure(lock: StoreLock, what: str, store: Path) -> Iterator[None]:
    """Release `lock` when the block fails; a file-system failure becomes one line saying `what` and how to go on."""
    try:
        yield
    except OSError as exc:
        lock.release()
        raise _os_error(exc, what, store, resume=True) from None
    except BaseException:
        lock.release()
        raise


def _clear(path: Path) -> None:
    """Empty an existing store for `--overwrite`: mark it `initializing` first, then delete all but zarr.json."""
    if (path / rootmeta.ROOT_META).exists():
        rootmeta.update_attrs(path, {"status": "initializing", "committed": {}})
    for child in path.iterdir():
        if child.name == rootmeta.ROOT_META:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _os_error(exc: OSError, what: str, store: Path, *, resume: bool = False) -> StoreError | WriterError:
    """One line for a file-system failure: what failed, the file, why, and what to do."""
    target = exc.filename or store
    if exc.errno == errno.ENOSPC:
        free = shutil.disk_usage(_existing_parent(Path(target))).free / 2**20
        again = f"then run `gentrace record --resume --out {store}`" if resume else "then run it again"
        return WriterError(f"{what}: the disk is full writing {target} ({free:.1f} MiB free); free space, {again}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(f"{what}: {target} is not writable ({exc.strerror}); choose a writable --out path")
    return WriterError(f"{what}: {exc.strerror or exc} ({target})")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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
    with _released_on_failure(lock, f"cannot continue the store {path}", path):
        for leftover in path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
        root = zarr.open_group(LocalStore(path), mode="r+", zarr_format=3)
        writer = StoreWriter(root, lock, path)
        writer.write_attrs({"status": "running", "writer_process": _process_name()})
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
        try:
            await array.async_array.setitem(slice(start, start + len(values)), values)
        except OSError as exc:  # zarr's own writes do not say which file
            raise OSError(exc.errno, exc.strerror, exc.filename or str(array.store_path)) from None


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


def _write_static(store: Path, root: zarr.Group, spec: schema.ArraySpec, values: np.ndarray) -> None:
    """Write a static array whole: its chunks of whole rows encoded here with the array's own codecs.

    The bytes zarr's own write gives (tests/test_writer_tails.py), without its ~5 ms of Python per
    array; an array whose rows are split across chunks goes through zarr.
    """
    chunks = spec.chunks()
    if tuple(chunks[1:]) != tuple(values.shape[1:]) or spec.codec not in schema.CHUNK_ENCODERS:
        zarr.open_array(root.store, path=spec.path, mode="r+", zarr_format=3).with_config(WRITE_CONFIG)[...] = values
        return
    per = chunks[0]
    for index in range(math.ceil(len(values) / per)):
        part = values[index * per : (index + 1) * per]
        chunk = np.full((per, *values.shape[1:]), spec.fill_value, dtype=spec.dtype)
        chunk[: len(part)] = part
        key = ".".join(["c", str(index), *["0"] * (values.ndim - 1)])
        (store / spec.path / key).write_bytes(_encode_chunk(spec.codec, spec.dtype, chunk))


def _encode_chunk(codec: str, dtype: Any, values: np.ndarray) -> bytes:
    """A chunk file's bytes: `values` (the whole chunk) little-endian, encoded with the schema's `codec`."""
    little = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    return schema.CHUNK_ENCODERS[codec]().encode(little)


def _create_arrays(root: Path, specs: list[tuple[schema.ArraySpec, int]]) -> None:
    """Create many arrays at once: their `zarr.json` files written directly, from metadata zarr itself made.

    zarr's own create_array costs ~2-4 ms of Python per array (a run has dozens, a vision transformer
    hundreds). The metadata of arrays of one dtype and codec (the fill value follows from the dtype)
    differ only in `shape`, `chunk_grid` and `attributes` (the codecs depend on the dtype alone: byte
    order, Blosc's typesize), so zarr builds one array per such kind in memory (`_template`), and each
    array's `zarr.json` is that document with its own shape, chunk shape and attributes. Parent groups
    are written first (plain group documents).
    """
    parents = sorted({spec.path.rsplit("/", 1)[0] for spec, _ in specs if "/" in spec.path}, key=len)
    for parent in parents:
        for depth in range(1, parent.count("/") + 2):
            group = root / "/".join(parent.split("/")[:depth])
            if not (group / "zarr.json").exists():
                group.mkdir(parents=True, exist_ok=True)
                (group / "zarr.json").write_text(json.dumps(GROUP_DOCUMENT))

    for spec, _ in specs:  # made here, before the threads below read them
        _template(spec.dtype, spec.codec)

    def create(spec: schema.ArraySpec, rows: int) -> None:
        document = dict(_template(spec.dtype, spec.codec))
        document["shape"] = [rows, *spec.row_shape]
        document["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": list(spec.chunks())}}
        document["attributes"] = {**spec.attrs, "gentrace_codec": spec.codec}
        target = root / spec.path
        if target.exists():  # `overwrite`: an array of that name is replaced whole, as zarr's create does
            shutil.rmtree(target)
        target.mkdir(parents=True)
        (target / "zarr.json").write_text(json.dumps(document, separators=(",", ":")))

    # A directory and a file per array, ~0.7 ms of kernel time each on a small VM: on two threads.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="gentrace-create") as pool:
        for future in [pool.submit(create, spec, rows) for spec, rows in specs]:
            future.result()


GROUP_DOCUMENT = {"zarr_format": 3, "node_type": "group", "attributes": {}}
# The metadata document of each (dtype, codec), made by zarr once per process (~3 ms each); the
# schema's fill value follows from the dtype (schema.ArraySpec.fill_value).
_TEMPLATES: dict[tuple[str, str], dict[str, Any]] = {}
# The data types the direct chunk path encodes (a NumPy dtype of the same name, zarr v3's core types).
_PLAIN_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"]
)


def _template(dtype: str, codec: str) -> dict[str, Any]:
    """The `zarr.json` zarr itself writes for a one-row array of `dtype` with the schema's `codec` (cached)."""
    key = (dtype, codec)
    if key not in _TEMPLATES:
        memory = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
        memory.create_array("t", **_array_kwargs(schema.ArraySpec("t", (), dtype, codec), 1))
        raw = sync(memory.store.get("t/zarr.json", prototype=default_buffer_prototype()))
        assert raw is not None
        _TEMPLATES[key] = json.loads(raw.to_bytes())
    return _TEMPLATES[key]


def _codecs_json(document: Mapping[str, Any]) -> list[Any]:
    """An array document's codecs as JSON, Blosc's `typesize` left out.

    zarr fills `typesize` in from the array's dtype when the array is created (4 for float32 and
    int32); the direct encoder (numcodecs' Blosc) takes it from the array it encodes, so it is the
    dtype's item size on both paths and says nothing about the bytes written.
    """
    codecs = []
    for codec in document.get("codecs", []):
        if isinstance(codec, dict) and isinstance(codec.get("configuration"), dict):
            codec = {**codec, "configuration": {k: v for k, v in codec["configuration"].items() if k != "typesize"}}
        codecs.append(codec)
    return codecs


def _layout(document: Mapping[str, Any]) -> _Layout:
    """The direct path's view of an array document; `codec` None unless every part of it is the schema's own."""
    shape = tuple(int(n) for n in document["shape"])
    grid = document.get("chunk_grid", {})
    chunks = tuple(int(n) for n in grid.get("configuration", {}).get("chunk_shape", shape))
    data_type, fill = document.get("data_type"), document.get("fill_value")
    keys = document.get("chunk_key_encoding", {})
    separator = keys.get("configuration", {}).get("separator", "/") if keys.get("name") == "default" else ""
    codec = document.get("attributes", {}).get("gentrace_codec")
    plain = isinstance(data_type, str) and data_type in _PLAIN_DTYPES
    if isinstance(fill, str):  # zarr v3 writes NaN and the infinities as strings, other floats as hex
        fill = float(fill) if fill in ("NaN", "Infinity", "-Infinity") else None
    direct = (
        plain
        and fill is not None
        and separator
        and chunks[1:] == shape[1:]
        and grid.get("name") == "regular"
        and codec in schema.CHUNK_ENCODERS
        and _codecs_json(document) == _codecs_json(_template(str(data_type), str(codec)))
    )
    dtype = np.dtype(data_type) if plain else np.dtype("V1")
    return _Layout(shape, chunks, dtype, fill, str(codec) if direct else None, separator or "/")


class StoreWriter:
    """Owns a store's zarr handles; writes `RowBlock`s on a background thread with a bounded queue."""

    def __init__(self, root: zarr.Group, lock: StoreLock, path: Path, queue_size: int = 2) -> None:
        self.root = root
        self.path = path
        self._lock = lock
        self._arrays: dict[str, zarr.Array] = {}
        attrs: dict[str, Any] = dict(rootmeta.read(path).get("attributes", {}))
        self._streams: dict[str, list[str]] = dict(attrs.get("streams", {}))
        self.stats = WriterStats(committed=dict(attrs.get("committed", {})))
        previous = attrs.get("writer", {})
        self.stats.busy_s = float(previous.get("busy_s", 0.0))
        self.stats.cpu_s = float(previous.get("cpu_s", 0.0))
        self.stats.bytes = int(previous.get("bytes", 0))
        self._total_steps = int(attrs.get("total_steps", 0) or 0)
        self._last_step = -1
        self._checkpoint_step = attrs.get(schema.CHECKPOINT_ATTR)
        # Chunk files written for rows not yet committed: deleted after a failure, to free a full disk.
        self._uncommitted: list[Path] = []
        self._queue: queue.Queue[RowBlock | _Finish | _Barrier | None] = queue.Queue(maxsize=queue_size)
        # How the failure message says to continue: `gentrace record --resume` unless the loop is the user's.
        self.resume_hint = f"`gentrace record --resume --out {path}`"
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._layouts: dict[str, _Layout] = {}
        # Per direct-path array with several rows per chunk: its last, unfilled chunk (see `_place`).
        self._tails: dict[str, _Tail] = {}
        # Per stream: the rows handed over and written, except those still waiting in a tail.
        self._handed: dict[str, int] = dict(self.stats.committed)
        self._flush_next = False  # write every tail at the next `_write_and_commit` (a barrier, the finish)
        self._last_write = time.monotonic()
        # Blosc and file writes release the GIL: two threads overlap encoding with I/O.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gentrace-chunks")

    def write_attrs(self, updates: Mapping[str, Any]) -> None:
        """Change root attributes in one atomic rewrite of the root zarr.json (the only way this writer does)."""
        rootmeta.update_attrs(self.path, updates)

    # -- set-up, on the calling thread before `start` -------------------------------------------
    def declare(self, streams: Iterable[schema.StreamSpec]) -> None:
        """Create (or grow to their preallocated length) the arrays of each stream."""
        new: list[tuple[schema.ArraySpec, int]] = []
        for stream in streams:
            self._streams[stream.name] = [spec.path for spec in stream.arrays]
            self.stats.committed.setdefault(stream.name, 0)
            self._handed.setdefault(stream.name, self.stats.committed[stream.name])
            for spec in stream.arrays:
                if (self.path / spec.path / "zarr.json").exists():
                    array = self._array(spec.path)
                    if array.shape[0] < stream.rows:  # growing deletes nothing
                        array.resize((stream.rows, *array.shape[1:]))
                        self._forget(spec.path)
                else:
                    new.append((spec, stream.rows))
        if new:
            _create_arrays(self.path, new)
        self.write_attrs({"streams": self._streams, "committed": self.stats.committed})

    def truncate(self, keep: Mapping[str, int], checkpoint_step: int | None = None) -> None:
        """Forget the rows of each stream from `keep[stream]` on (resume keeps only rows up to its checkpoint).

        Crash-safe and repeatable: first every counter is lowered in one atomic write (the cut rows
        are then invisible), together with `checkpoint_step` (the checkpoint resumed from) when
        given; then the cut rows are cleared: fill values where they share a chunk with kept rows,
        their chunk files deleted otherwise. Array shapes never shrink here.
        """
        self._tails.clear()  # the cut rows may sit in a kept chunk: read it back from disk
        for stream, rows in keep.items():
            self.stats.committed[stream] = min(rows, self.stats.committed.get(stream, 0))
            self._handed[stream] = self.stats.committed[stream]
        updates: dict[str, Any] = {"committed": self.stats.committed}
        if checkpoint_step is not None:
            self._checkpoint_step = updates[schema.CHECKPOINT_ATTR] = checkpoint_step
        self.write_attrs(updates)
        for stream in keep:
            kept = self.stats.committed[stream]
            for path in self._streams.get(stream, []):
                if (self.path / path / "zarr.json").exists():
                    self._clear_rows(path, kept)

    def _clear_rows(self, path: str, first: int) -> None:
        """Fill rows `first..` of the chunk holding row `first`; delete every chunk file after it."""
        array = self._array(path)
        per_chunk = int(array.chunks[0])
        whole = -(-first // per_chunk)  # first chunk index wholly past the kept rows
        end = min(int(array.shape[0]), whole * per_chunk)
        if end > first:
            array[first:end] = array.fill_value
        _delete_chunks_from(self.path / path, whole)

    def start(self) -> None:
        """Start the background thread; from now on only it touches zarr."""
        self._thread = threading.Thread(target=self._run, name="gentrace-writer", daemon=True)
        self._thread.start()

    # -- training thread API --------------------------------------------------------------------
    def put(self, block: RowBlock) -> None:
        """Queue a block; blocks while the queue is full; re-raises a writer failure."""
        self._enqueue(block)

    def wait(self) -> None:
        """Block until every block queued so far is written and committed; re-raises a writer failure.

        A user's loop calls it before it saves its own checkpoint (gentrace.Run.state_dict), so the
        store holds every row up to that step when the checkpoint exists.
        """
        if self._thread is None or not self._thread.is_alive():
            self._raise_if_failed()
            return
        barrier = _Barrier()
        self._enqueue(barrier)
        while not barrier.done.wait(0.2):
            if not self._thread.is_alive():
                break
        self._raise_if_failed()

    def close(
        self,
        status: str,
        final_status: Callable[[str], str] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Write everything queued, set `status` (resizing arrays to committed on `complete`), release.

        `final_status`, when given, is asked at the moment the status is written (it turns a
        `complete` into `interrupted` when Ctrl-C came during the close). `attrs` are root attributes
        written in the same atomic rewrite as the status.
        """
        finish = _Finish(status, resize=status == "complete", final_status=final_status, attrs=dict(attrs or {}))
        try:
            if self._thread is not None and self._thread.is_alive():
                # The thread drains the queue even after a failure, so these puts never hang.
                self._enqueue(finish, check=False)
                self._enqueue(None, check=False)
                self._thread.join()
            elif self._error is None:
                try:
                    self._finish(finish)
                except BaseException as exc:  # noqa: BLE001 - reported below like a writer failure
                    self._error = exc
            if self._error is not None:
                self._mark_failed()
            self._raise_if_failed()
        finally:
            self._pool.shutdown(wait=True)
            self._lock.release()

    def _mark_failed(self) -> None:
        """Status `failed` with the reason; first free what the failed batch left (a full disk needs the room)."""
        for leftover in self._uncommitted:
            with contextlib.suppress(OSError):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink(missing_ok=True)
        self._uncommitted.clear()
        for leftover in self.path.rglob("*.partial"):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            update = {"status": "failed", "finished": now(), "error": self._message()}
            rootmeta.update_attrs(self.path, update, last_resort=True)

    def close_after_failure(self, status: str) -> None:
        """Best-effort close when training already failed: keep what is committed, never mask the error."""
        try:
            self.close(status)
        except WriterError:
            self._lock.release()

    def _enqueue(self, item: RowBlock | _Finish | _Barrier | None, check: bool = True) -> None:
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
            raise WriterError(self._message())

    def _message(self) -> str:
        """One line on the writer's failure: the file, why, how much room the run needs, how to continue."""
        error = self._error
        resume = self.resume_hint
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            target = Path(error.filename or self.path)
            free = shutil.disk_usage(_existing_parent(target)).free
            need = self._space_needed()
            needed = f"; the rest of the run needs about {_size(need)} more" if need else ""
            return (
                f"the disk is full: writing {target} failed ({_size(free)} free{needed}); rows committed before "
                f"are kept: free space, then continue with {resume}"
            )
        detail = f"{error.strerror}: {error.filename or self.path}" if isinstance(error, OSError) else repr(error)
        return f"writing the store {self.path} failed ({detail}); rows committed before are kept (continue: {resume})"

    def _space_needed(self) -> int:
        """Bytes the rest of the run will take, from the bytes on disk so far and the steps committed."""
        if self._last_step <= 0 or self._total_steps <= self._last_step:
            return 0
        used = disk_usage(self.path)[1]
        return math.ceil(used * (self._total_steps - self._last_step) / self._last_step)

    # -- background thread ----------------------------------------------------------------------
    def _collect(self) -> list[RowBlock | _Finish | _Barrier | None]:
        """The next items to write and commit together: rows for up to `COMMIT_EVERY_S` (or `COMMIT_BYTES`).

        A recording hands over its rows in bursts (every probe due at an epoch's step, then the
        per-step streams' blocks), so one window usually holds a whole burst.

        Every commit costs fixed work (the root zarr.json rewritten and renamed, ~1-2 ms), and the
        writer shares the training process's cores and GIL. Rows arriving within the window are
        written and committed as one: a kill loses at most the window's rows, which were not
        committed (readable up to the last committed row, as always), and `--resume` recomputes them
        from the last checkpoint anyway. A row with a checkpoint (a resume point), a finish, a
        barrier or a close ends the window at once. With no item in the queue, the wait ends when
        the oldest row waiting in a tail is due (`FLUSH_EVERY_S`): an empty list, a flush.
        """
        due = self._flush_due()
        try:
            first = self._queue.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
        except queue.Empty:
            return []
        items: list[RowBlock | _Finish | _Barrier | None] = [first]
        deadline = time.monotonic() + COMMIT_EVERY_S
        held = _nbytes(items[0])
        # At most the queue's length more: a writer stalled on a slow disk still holds back `put`.
        while _joins_window(items[-1]) and len(items) <= self._queue.maxsize and held < COMMIT_BYTES:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            items.append(item)
            held += _nbytes(item)
        return items

    def _run(self) -> None:
        while True:
            items = self._collect()
            if not items:  # a tail's rows are due
                self._flush_next = True
            pending: list[RowBlock] = []
            for item in items:
                if isinstance(item, _Barrier):
                    if self._error is None:
                        try:
                            self._flush_next = True
                            self._write_and_commit(pending)
                        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                            self._error = exc
                    item.done.set()
                    continue
                if item is None or self._error is not None:
                    continue  # on error, drain: the training thread sees it at its next put
                try:
                    if isinstance(item, _Finish):
                        self._flush_next = True
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
            if items and items[-1] is None:
                return

    def _flush_due(self) -> float | None:
        """When the rows waiting in tails must be written (monotonic time), None if no row waits.

        FLUSH_EVERY_S after the oldest was handed over, or IDLE_FLUSH_S after the last write.
        """
        waiting = [tail.since for tail in self._tails.values() if tail.end > tail.on_disk]
        return min(min(waiting) + FLUSH_EVERY_S, self._last_write + IDLE_FLUSH_S) if waiting else None

    def _write_and_commit(self, blocks: list[RowBlock]) -> None:
        """Write every chunk of `blocks` (concurrently), their checkpoints, then raise the counters.

        Rows of arrays with several rows per chunk go into the array's tail (`_place`); the tails are
        written (flushed) too when a block carries a checkpoint (every stream then holds its rows up
        to the checkpoint's step, which `--resume` needs), when `_flush_next` is set (a barrier, the
        finish, a due tail) or when the oldest waiting row is due.
        """
        flush = self._flush_next or any(block.checkpoint is not None for block in blocks)
        due = self._flush_due()
        flush = flush or (due is not None and time.monotonic() >= due)
        self._flush_next = False
        if not blocks and not (flush and due is not None):
            return
        t0, cpu0 = time.perf_counter(), time.thread_time()
        parts: dict[str, list[tuple[int, np.ndarray]]] = {}
        for block in blocks:
            stop = block.start + block.rows
            for path, values in block.arrays.items():
                shape = self._layout(path).shape
                if shape[0] < stop:
                    self._array(path).resize((max(stop, shape[0] + schema.GROW_ROWS), *shape[1:]))
                    self._forget(path)
                parts.setdefault(path, []).append((block.start, values))
                self.stats.bytes += values.nbytes
        direct = {path: rows for path, rows in parts.items() if self._row_chunks(path)}
        # Arrays are written concurrently; the rows of one array in order, contiguous ones merged,
        # because two writes into one chunk would each rewrite it and the last would win.
        zarr_parts = [_write_rows(self._array(path), rows) for path, rows in parts.items() if path not in direct]
        chunks = [chunk for path, rows in direct.items() for chunk in self._place(path, rows)]
        flushed = [path for path, tail in self._tails.items() if flush and tail.end > tail.on_disk]
        chunks += [self._tail_chunk(path) for path in flushed]
        futures = [self._pool.submit(self._write_chunk, *chunk) for chunk in chunks]
        errors: list[BaseException] = []
        if zarr_parts:
            try:
                sync(_gather(zarr_parts))
            except BaseException as exc:  # noqa: BLE001 - raised once every chunk write has ended
                errors.append(exc)
        for future in futures:
            try:
                self.stats.cpu_s += future.result()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]
        for path in flushed:
            self._tails[path].on_disk = self._tails[path].end
        for block in blocks:
            if block.checkpoint is not None:
                self._write_checkpoint(block.checkpoint, block.checkpoint_step)
        self.stats.blocks += len(blocks)
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.cpu_s += time.thread_time() - cpu0
        self._commit_written(blocks)
        self._last_write = time.monotonic()

    def _commit_written(self, blocks: list[RowBlock]) -> None:
        """Raise the committed counters to the rows now wholly on disk (one attrs write), then prune checkpoints."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        for block in blocks:
            stop = block.start + block.rows
            self._handed[block.stream] = max(stop, self._handed.get(block.stream, 0))
            steps = block.arrays.get(schema.step_of(block.stream))
            if steps is not None and len(steps):
                self._last_step = max(self._last_step, int(np.max(steps)))
        raised = False
        for stream, handed in self._handed.items():
            tails = [self._tails[p] for p in self._streams.get(stream, []) if p in self._tails]
            durable = min([handed] + [tail.on_disk for tail in tails if tail.end > tail.on_disk])
            if durable > self.stats.committed.get(stream, 0):
                self.stats.committed[stream] = durable
                raised = True
        checkpoints = [b.checkpoint_step for b in blocks if b.checkpoint is not None]
        if checkpoints:
            self._checkpoint_step = checkpoints[-1]
        if raised or checkpoints:
            self._commit()
        self._uncommitted.clear()
        if checkpoints:
            self.prune_checkpoints(upto=checkpoints[-1])
        blocks.clear()
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.cpu_s += time.thread_time() - cpu0

    def _commit_attrs(self) -> dict[str, Any]:
        return {
            "committed": self.stats.committed,
            schema.CHECKPOINT_ATTR: self._checkpoint_step,
            "writer": {
                "busy_s": round(self.stats.busy_s, 4),
                "cpu_s": round(self.stats.cpu_s, 4),
                "blocks": self.stats.blocks,
                "bytes": self.stats.bytes,
            },
        }

    def _commit(self) -> None:
        # The root zarr.json is replaced atomically: either the old or the new counters are visible.
        self.write_attrs(self._commit_attrs())

    def _finish(self, item: _Finish) -> None:
        if item.resize:
            for stream, paths in self._streams.items():
                rows = self.stats.committed.get(stream, 0)
                for path in paths:
                    layout = self._layout(path)
                    if layout.shape[0] != rows:
                        # Metadata first, then the chunk files past it: a kill in between leaves
                        # only unreferenced files, never a shape below the committed rows.
                        array = self._array(path).async_array
                        sync(array.resize((rows, *layout.shape[1:]), delete_outside_chunks=False))
                        self._forget(path)
                        _delete_chunks_from(self.path / path, -(-rows // layout.chunks[0]))
        status = item.final_status(item.status) if item.final_status is not None else item.status
        self.write_attrs({**item.attrs, **self._commit_attrs(), "status": status, "finished": now()})

    def _row_chunks(self, path: str) -> str | None:
        """The codec of an array whose chunks hold whole rows (the direct path), else None.

        zarr's generic write costs ~1 ms per chunk in Python (codec pipeline, event loop hops, and
        a read of the chunk when it holds several rows); a chunk of whole rows needs none of it:
        the writer assembles the chunk (see `_place`), encodes it with the array's own
        codecs (crc32c included) and writes the chunk file. The direct encoder writes what the
        schema's codecs write today: an array with other codecs (a schema-1 store being resumed)
        goes through zarr (`_layout`).
        """
        return self._layout(path).codec

    def _place(self, path: str, parts: list[tuple[int, np.ndarray]]) -> list[tuple[str, int, np.ndarray, bool]]:
        """Chunks to write now for rows `parts` (start, rows) of a direct-path array: (path, index, chunk, replace).

        One row per chunk: each row is its chunk. Several rows per chunk: the rows go into the
        array's tail, the chunk assembled whole in memory (fill values where no row is yet) from the
        rows handed over before or, the first time after a resume, from its committed rows on disk;
        a chunk is written when it is full (here) or at a flush (`_tail_chunk`). Writing each chunk
        once rather than once per commit is what keeps the file count (~0.4 ms of kernel time per
        file on these machines) near bytes / chunk size.
        """
        layout = self._layout(path)
        per = layout.chunks[0]
        if per == 1:
            return [(path, start + i, values[i], False) for start, values in parts for i in range(len(values))]
        writes: list[tuple[str, int, np.ndarray, bool]] = []
        for start, values in parts:
            row, stop = start, start + len(values)
            while row < stop:
                index = row // per
                upto = min(stop, (index + 1) * per)
                tail = self._tails.get(path)
                if tail is None or tail.index != index:
                    tail = self._tails[path] = self._open_tail(path, layout, index)
                if tail.end <= tail.on_disk:
                    tail.since = time.monotonic()
                tail.rows[row - index * per : upto - index * per] = values[row - start : upto - start]
                tail.end = max(tail.end, upto)
                row = upto
                if tail.end == (index + 1) * per:  # full: written now, never again
                    writes.append(self._tail_chunk(path))
                    del self._tails[path]
        return writes

    def _open_tail(self, path: str, layout: _Layout, index: int) -> _Tail:
        """Chunk `index` of the array at `path` as it stands: fill values, its committed rows read back from disk."""
        per = layout.chunks[0]
        rows = np.full((per, *layout.shape[1:]), layout.fill_value, dtype=layout.dtype.newbyteorder("<"))
        first = index * per
        stop = min(self.stats.committed.get(schema.stream_of(path), 0), first + per, layout.shape[0])
        if stop > first:  # a run resumed inside this chunk: its committed rows are on disk
            rows[: stop - first] = self._array(path)[first:stop]
        kept = max(first, stop)
        return _Tail(index, rows, end=kept, on_disk=kept, since=time.monotonic())

    def _tail_chunk(self, path: str) -> tuple[str, int, np.ndarray, bool]:
        """The write of `path`'s tail chunk: replaced atomically when it holds committed rows.

        A chunk with committed rows is written to a `.partial` file and renamed over the old one, so a
        kill leaves the old chunk or the new one, never a torn chunk under committed rows. A chunk
        with no committed row is written in place: if a kill tears it, its rows are uncommitted and
        resume deletes it.
        """
        tail = self._tails[path]
        per = len(tail.rows)
        committed = self.stats.committed.get(schema.stream_of(path), 0)
        return (path, tail.index, tail.rows, tail.index * per < committed)

    def _write_chunk(self, path: str, index: int, values: np.ndarray, replace: bool) -> float:
        """Encode and write one chunk file (on the pool's thread); returns the CPU seconds it took."""
        cpu0 = time.thread_time()
        layout = self._layouts[path]  # read by `_place` or `_tail_chunk` before this write was handed out
        assert layout.codec is not None
        target = self.path / path / layout.key(index)
        encoded = _encode_chunk(layout.codec, layout.dtype, values)
        written = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial") if replace else target
        self._uncommitted.append(written)  # never the old chunk of committed rows: a failure must keep it
        try:
            written.write_bytes(encoded)
            if replace:
                os.replace(written, target)
        except OSError as exc:  # name the file: a full disk's OSError from write() has none
            raise OSError(exc.errno, exc.strerror, str(target)) from None
        return time.thread_time() - cpu0

    def _write_checkpoint(self, payload: bytes, step: int) -> None:
        # A plain uint8 array (one chunk) keeps the store pure Zarr; it is complete before the commit.
        values = np.frombuffer(payload, dtype=np.uint8)
        spec = schema.checkpoint_array(step, len(values))
        self._uncommitted.append(self.path / spec.path)
        try:
            _create_arrays(self.path, [(spec, len(values))])
            _write_static(self.path, self.root, spec, values)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, exc.filename or str(self.path / spec.path)) from None

    def prune_checkpoints(self, upto: int) -> None:
        """Keep the newest `schema.CHECKPOINTS_KEPT` checkpoints at or before step `upto`; delete the rest.

        Checkpoints after `upto` belong to rows resume cut away. Two are kept so that a damaged
        newest checkpoint still leaves one to resume from.
        """
        directory = self.path / CHECKPOINT_DIR
        if not directory.is_dir():
            return
        steps = sorted(schema.checkpoint_step(child.name) for child in directory.iterdir() if child.is_dir())
        keep = set([s for s in steps if 0 <= s <= upto][-schema.CHECKPOINTS_KEPT :])
        for step in steps:
            if step not in keep:
                shutil.rmtree(directory / schema.checkpoint_name(step), ignore_errors=True)

    def _layout(self, path: str) -> _Layout:
        """The array at `path` as the direct chunk path sees it, read from its `zarr.json` (cached).

        Building zarr's own array (its metadata parsed into objects, ~0.5 ms) for each of a run's
        dozens of arrays was a fifth of a small run's writer time; the direct path needs only the
        shape, chunk shape, dtype, fill value and key encoding, and whether the codecs are the schema's.
        """
        if path not in self._layouts:
            try:
                document = json.loads((self.path / path / "zarr.json").read_bytes())
            except FileNotFoundError:  # zarr names the missing array in its own words
                zarr.open_array(self.root.store, path=path, mode="r+", zarr_format=3)
                raise
            self._layouts[path] = _layout(document)
        return self._layouts[path]

    def _forget(self, path: str) -> None:
        """Drop what is cached of the array at `path` (its metadata changed: a resize)."""
        self._arrays.pop(path, None)
        self._layouts.pop(path, None)

    def _array(self, path: str) -> zarr.Array:
        """The zarr array at `path` (a resize, a read back, the generic write), built from its `zarr.json` read here.

        zarr's open_array costs ~1.2 ms (store reads through its event loop), once per array and
        again after every resize.
        """
        if path not in self._arrays:
            try:
                document = json.loads((self.path / path / "zarr.json").read_bytes())
                metadata = ArrayV3Metadata.from_dict(document)
            except FileNotFoundError:  # zarr names the missing array in its own words
                array = zarr.open_array(self.root.store, path=path, mode="r+", zarr_format=3)
            else:
                array = zarr.Array(AsyncArray(metadata, StorePath(self.root.store, path)))
            self._arrays[path] = array.with_config(WRITE_CONFIG)
        return self._arrays[path]


def _joins_window(item: object) -> bool:
    """Whether more rows may join a commit ending with `item`: not after a checkpoint, finish, barrier or close."""
    return isinstance(item, RowBlock) and item.checkpoint is None


def _nbytes(item: object) -> int:
    return sum(v.nbytes for v in item.arrays.values()) if isinstance(item, RowBlock) else 0


def _size(nbytes: float) -> str:
    """1.5 MiB, 230 KiB, 12 B."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def _delete_chunks_from(array_dir: Path, first_chunk: int) -> None:
    """Delete the chunk files of `array_dir` whose first grid index is `first_chunk` or later."""
    if not array_dir.is_dir():
        return
    for child in array_dir.iterdir():
        match = CHUNK_FILE.match(child.name)
        if match is not None and int(match.group(1)) >= first_chunk:
            child.unlink(missing_ok=True)
