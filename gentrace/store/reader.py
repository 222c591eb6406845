"""Read-only access to a run store; every array is sliced to its stream's committed row count.

A reader never trusts `shape[0]`: a preallocated or killed store has rows past `committed` that
hold fill values (NaN, -1) or a torn row. Arrays are re-opened on every access, so a reader of a
live run sees it grow.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from gentrace.core.errors import DamagedStoreError, MissingStreamError, SchemaVersionError, StoreError
from gentrace.store import schema
from gentrace.store.integrity import CheckedArray, CheckedStore, checked, verify_hint
from gentrace.store.lock import is_locked


def check_gentrace_store(path: Path) -> dict[str, Any]:
    """Return the root attrs of a gentrace store, or raise StoreError saying what the path is instead."""
    path = Path(path)
    meta_file = path / "zarr.json"
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    if not path.is_dir() or not meta_file.exists():
        if path.is_dir() and any((child / "zarr.json").exists() for child in path.iterdir() if child.is_dir()):
            raise DamagedStoreError(
                f"{meta_file} is missing but the store's arrays are there: the store is damaged "
                "(its config, status and committed rows were in that file); record the run again"
            )
        raise StoreError(f"{path} is not a gentrace store (no zarr.json); give the directory `gentrace record` wrote")
    try:
        parsed = json.loads(meta_file.read_text())
        attrs = parsed.get("attributes", {})
        if not isinstance(attrs, dict):
            raise ValueError("its attributes are not a JSON object")
    except (OSError, ValueError, AttributeError) as exc:
        raise DamagedStoreError(f"{meta_file} cannot be read ({str(exc)[:160]}); the store is damaged") from None
    if attrs.get("format") != schema.FORMAT_NAME:
        raise StoreError(f"{path} is a Zarr store but not a gentrace store (no format attribute 'gentrace')")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or version > schema.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path} has store schema version {version}, newer than this gentrace reads "
            f"({schema.SCHEMA_VERSION}); upgrade gentrace (pip install -U gentrace)"
        )
    return dict(attrs)


def disk_usage(directory: Path) -> tuple[int, int]:
    """(files, bytes) on disk under `directory`: a whole store, or one array of it."""
    files = [f for f in Path(directory).rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


class StoreReader:
    """Read-only view of one store.

    Attributes:
        path: the store directory.
    """

    def __init__(self, path: Path | str, *, compacting_ok: bool = False, check_checkpoint: bool = True) -> None:
        self.path = Path(path)
        attrs = check_gentrace_store(self.path)
        if attrs.get(schema.COMPACTING_ATTR) and not compacting_ok:
            raise StoreError(
                f"{self.path} is being compacted (or its compaction was killed); wait for `gentrace compact` "
                "to finish, or run it again"
            )
        self.checked = int(attrs.get("schema_version", 1)) >= schema.CHECKSUM_SCHEMA_VERSION
        store = (
            CheckedStore(self.path, rows_of=self._rows_required)
            if self.checked
            else LocalStore(self.path, read_only=True)
        )
        self._root = zarr.open_group(store, mode="r", zarr_format=3)
        if check_checkpoint:  # `--resume` and `verify` look at every checkpoint themselves
            self._check_checkpoint(attrs)

    def _check_checkpoint(self, attrs: dict[str, Any]) -> None:
        """The checkpoint the store says it resumes from must be there (a cheap stat; `verify` reads it)."""
        step = attrs.get(schema.CHECKPOINT_ATTR)
        if not isinstance(step, int) or step < 0:
            return
        where = self.path / schema.CHECKPOINT_GROUP / schema.checkpoint_name(step)
        if not ((where / "zarr.json").is_file() and any(where.glob("c*"))):
            raise DamagedStoreError(
                f"{self.path}: the checkpoint of step {step} ({where.relative_to(self.path)}) is missing; "
                f"{verify_hint(self.path)}"
            )

    def _rows_required(self, path: str) -> int:
        """Rows of `path` whose chunks must exist: the committed rows of a stream, every row otherwise."""
        stream = schema.stream_of(path)
        if path in self.streams().get(stream, []):
            return self.committed(stream)
        return sys.maxsize

    # -- attributes ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        """Root attrs, re-read from disk (they change while a run is live)."""
        return check_gentrace_store(self.path)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved run config, as plain data."""
        return dict(self.attrs["config"])

    @property
    def status(self) -> str:
        """Running | complete | interrupted | diverged | failed; `killed` for a running store without a writer."""
        status = str(self.attrs.get("status", "unknown"))
        if status in ("running", "initializing") and not is_locked(self.path):
            return "killed"
        return status

    def committed(self, stream: str) -> int:
        """Rows of `stream` safely written (0 for a stream the run does not record)."""
        return int(self.attrs.get("committed", {}).get(stream, 0))

    def streams(self) -> dict[str, list[str]]:
        """Stream name -> paths of its arrays."""
        return {k: list(v) for k, v in self.attrs.get("streams", {}).items()}

    def has(self, stream: str) -> bool:
        """Whether the run records this stream at all."""
        return stream in self.streams()

    def require(self, stream: schema.Stream) -> None:
        """Raise MissingStreamError ("this run has no <what>; record them with <key>") if absent or empty."""
        if not self.has(stream.name) or self.committed(stream.name) == 0:
            what, key = stream.missing()
            raise MissingStreamError(f"{self.path}: this run has no {what}; record them with {key}")

    def tensor_names(self, stream: str) -> list[str]:
        """Tensor names of a snapshot stream (`params`, `params_fine`), in recording order."""
        return schema.TENSOR_STREAMS[stream].tensors_in(self.streams().get(stream, []))

    def grad_tensor_names(self) -> list[str]:
        """Tensor names with gradient moments (`grad/<tensor>/sum` ...), in recording order."""
        return schema.GRAD.tensors_in(self.streams().get(schema.GRAD.name, []))

    def act_layers(self) -> list[str]:
        """ReLU call sites with activation bitmasks (`acts/<layer>/bits`), in forward order."""
        return schema.ACTS.layers_in(self.streams().get(schema.ACTS.name, []))

    # -- arrays -------------------------------------------------------------------------------
    def array(self, path: str) -> np.ndarray:
        """The committed rows of a stream array (or the whole of a static `data/` array)."""
        array = self.lazy(path)
        return np.asarray(array[: self._rows_of(path, array)])

    def lazy(self, path: str) -> CheckedArray:
        """The zarr array itself (re-opened), for chunked reads; slice it to `rows(path)` yourself.

        Reads of damaged chunks raise DamagedStoreError (gentrace.store.integrity).
        """
        try:
            node = zarr.open_array(self._root.store, path=path, mode="r", zarr_format=3)
        except (KeyError, FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
            if any(path in paths for paths in self.streams().values()):
                raise DamagedStoreError(
                    f"{self.path}: the array {path} of this run is missing (no {path}/zarr.json); "
                    f"{verify_hint(self.path)}"
                ) from None
            raise MissingStreamError(f"{self.path} has no array {path}") from None
        except Exception as exc:  # noqa: BLE001 - unreadable metadata (bad JSON, wrong fields) is damage
            raise DamagedStoreError(
                f"{self.path}: the metadata file {path}/zarr.json cannot be read ({str(exc).splitlines()[0][:120]}); "
                f"{verify_hint(self.path)}"
            ) from None
        return checked(node)

    def rows(self, path: str) -> int:
        """Committed rows of the array at `path`."""
        return self._rows_of(path, self.lazy(path))

    def iter_rows(self, path: str, block: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, rows) blocks of a stream array, reading lazily so memory stays bounded."""
        array = self.lazy(path)
        rows = self._rows_of(path, array)
        for start in range(0, rows, block):
            yield start, np.asarray(array[start : min(rows, start + block)])

    def _rows_of(self, path: str, array: zarr.Array) -> int:
        stream = schema.stream_of(path)
        if stream == schema.DATA.name or stream not in self.streams():
            return int(array.shape[0])
        committed = self.committed(stream)
        if int(array.shape[0]) < committed:
            raise DamagedStoreError(
                f"{self.path}: {path} has {array.shape[0]} rows but {committed} are committed; {verify_hint(self.path)}"
            )
        return committed

    def checkpoint_steps(self) -> list[int]:
        """Steps that have a resume checkpoint on disk (committed or not: compare with params/step)."""
        if schema.CHECKPOINT_GROUP not in self._root:
            return []
        group = self._root[schema.CHECKPOINT_GROUP]
        assert isinstance(group, zarr.Group)
        return sorted(int(name.split("-", 1)[1]) for name in group.array_keys())

    def epochs(self, stream: str) -> np.ndarray:
        """Completed epochs at each committed row of `stream` [rows] (step // steps_per_epoch)."""
        return self.array(schema.STREAMS[stream].step) // int(self.attrs["steps_per_epoch"])

    def checkpoint(self, step: int) -> bytes:
        """The serialized training state saved with the parameter snapshot at `step`."""
        path = f"{schema.CHECKPOINT_GROUP}/{schema.checkpoint_name(step)}"
        try:
            node = zarr.open_array(self._root.store, path=path, mode="r", zarr_format=3)
        except (KeyError, FileNotFoundError, zarr.errors.ArrayNotFoundError):
            raise StoreError(
                f"{self.path} has no checkpoint for step {step}; it cannot be resumed from there"
            ) from None
        except Exception as exc:  # noqa: BLE001 - unreadable metadata is damage
            raise DamagedStoreError(f"{self.path}: the checkpoint of step {step} is damaged ({exc})") from None
        return np.asarray(checked(node)[...]).tobytes()

    def array_paths(self) -> list[str]:
        """Every array in the store (static and streamed)."""
        data = self._root.get(schema.DATA.name, None)
        paths = [schema.DATA.path(name) for name in data.array_keys()] if isinstance(data, zarr.Group) else []
        for stream_paths in self.streams().values():
            paths.extend(stream_paths)
        return paths

    def disk_bytes(self, path: str) -> int:
        """Bytes on disk of one array (all its chunk files and metadata)."""
        return disk_usage(self.path / path)[1]

    def logical_bytes(self, path: str) -> int:
        """Uncompressed bytes of the committed rows of one array."""
        array = self.lazy(path)
        rows = self._rows_of(path, array)
        return rows * int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
