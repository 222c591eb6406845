"""Integrity of a store: damage inside the committed rows is an error that names the array and row.

zarr reads a missing chunk as the fill value and reports a damaged one as a codec traceback. A
gentrace store (schema version 2 and later) is written so that neither can be mistaken for data:
every chunk ends with a crc32c of its bytes (schema.zarr_codecs), and every chunk inside the
committed rows exists (arrays are written with `write_empty_chunks`). Readers open stores through

- `CheckedStore`, a LocalStore whose `get` raises DamagedStoreError for a chunk inside the
  committed rows that is missing or whose checksum does not match (a flipped byte, a truncated
  file), naming the chunk file and the rows it holds, and
- `CheckedArray`, a zarr Array whose reads turn any other decode failure (a sharded chunk's
  checksum, a damaged shard index) into the same one-line error.

`verify(path)` (the `gentrace verify` command) reads every committed chunk and checkpoint of a
store and reports, per stream, which rows are damaged. Stores of schema version 1 carry no
checksums and may omit chunks that hold only fill values; they are read without these checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from gentrace.core.errors import DamagedStoreError, GentraceError
from gentrace.store import rootmeta

# "params/0.weight/c.5.0.0": the array path, then the chunk's grid index (default encoding, "." separator).
CHUNK_KEY = re.compile(r"^(?P<array>.+)/c(?P<index>(\.\d+)+)$")
# Rows read per call while verifying, at most this many bytes (then chunk by chunk where one fails).
VERIFY_BLOCK_BYTES = 32 * 2**20


def verify_hint(store: Path) -> str:
    """The advice every damage message ends with."""
    return f"run `gentrace verify {store}` for the list of damaged rows"


def rows_text(first: int, last: int) -> str:
    """`row 5` or `rows 5..9` (inclusive)."""
    return f"row {first}" if first == last else f"rows {first}..{last}"


@dataclass(frozen=True)
class _Layout:
    """What a chunk key tells about rows: rows per chunk file, and whether the file is checksummed whole."""

    chunk_rows: int
    sharded: bool
    checksummed: bool


def _layout(meta: dict[str, Any]) -> _Layout:
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") or [1]
    codecs = list(meta.get("codecs", []))
    names = [c.get("name") for c in codecs if isinstance(c, dict)]
    if names and names[0] == "sharding_indexed":
        inner = codecs[0].get("configuration", {}).get("codecs", [])
        inner_names = [c.get("name") for c in inner if isinstance(c, dict)]
        return _Layout(int(grid[0]) if grid else 1, True, "crc32c" in inner_names)
    return _Layout(int(grid[0]) if grid else 1, False, "crc32c" in names)


class CheckedStore(LocalStore):
    """A read-only LocalStore that refuses to hand zarr a missing or corrupt chunk of the committed rows.

    `rows_of(array_path)` gives the rows that must be there (the stream's committed count; every
    row for static arrays). Only checksummed arrays are checked (schema version 2 and later).
    """

    def __init__(
        self, root: Path | str, *, read_only: bool = True, rows_of: Callable[[str], int] | None = None
    ) -> None:
        super().__init__(root, read_only=read_only)
        self._rows_of = rows_of or (lambda _: sys.maxsize)
        self._layouts: dict[str, _Layout | None] = {}

    def with_read_only(self, read_only: bool = False) -> CheckedStore:  # noqa: D102 - inherited
        return CheckedStore(self.root, read_only=read_only, rows_of=self._rows_of)

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        """LocalStore.get, then the missing-chunk and checksum checks of the module docstring."""
        value = await super().get(key, prototype, byte_range)
        match = CHUNK_KEY.match(key)
        if match is None:
            return value
        array_path = match["array"]
        layout = self.layout(array_path)
        if layout is None or not layout.checksummed:
            return value
        if value is None:
            what = "missing"
        elif byte_range is None and not layout.sharded and not checksum_ok(value.to_bytes()):
            what = "damaged (its checksum does not match)"
        else:
            return value
        first = int(match["index"][1:].split(".")[0]) * layout.chunk_rows
        rows = self._rows_of(array_path)
        if first < rows:  # past the committed rows a chunk is preallocated or uncommitted: never data
            last = min(first + layout.chunk_rows, rows) - 1
            raise DamagedStoreError(
                f"{self.root}: {array_path} {rows_text(first, last)}: chunk file {key} is {what}; "
                f"{verify_hint(Path(self.root))}"
            )
        return value

    def layout(self, array_path: str) -> _Layout | None:
        """Rows per chunk and codecs of an array, from its zarr.json (None when unreadable: zarr then fails)."""
        if array_path not in self._layouts:
            try:
                self._layouts[array_path] = _layout(rootmeta.read(Path(self.root) / array_path))
            except (OSError, ValueError, TypeError, AttributeError):
                return None
        return self._layouts[array_path]


def checksum_ok(data: bytes) -> bool:
    """Whether `data` ends with the crc32c (little-endian uint32) of the bytes before it."""
    if len(data) < 4:
        return False
    return int(google_crc32c.value(data[:-4])) == int.from_bytes(data[-4:], "little")


class CheckedArray(zarr.Array):
    """A zarr Array whose reads raise DamagedStoreError (array, selection) instead of a codec traceback."""

    def __getitem__(self, selection: Any) -> Any:
        try:
            return super().__getitem__(selection)
        except MemoryError:  # a read too large for memory is not damage (bounded-memory callers retry smaller)
            raise
        except Exception as exc:  # noqa: BLE001 - a decode failure of stored bytes is damage, reported as such
            settle()
            if isinstance(exc, GentraceError):
                raise
            store = Path(str(getattr(self.store, "root", "")))
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DamagedStoreError(
                f"{store}: reading {self.path}[{_describe(selection)}] failed ({detail[:160]}); {verify_hint(store)}"
            ) from None


async def _settle(timeout: float) -> None:
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    if others:
        await asyncio.wait(others, timeout=timeout)
        for task in others:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: no "exception was never retrieved" at exit


def settle(timeout: float = 5.0) -> None:
    """Let the chunk reads a failed zarr call left running in zarr's event loop end (no noise at exit)."""
    with contextlib.suppress(Exception):
        sync(_settle(timeout))


def checked(array: zarr.Array) -> CheckedArray:
    """`array` with CheckedArray's reads."""
    return CheckedArray(array._async_array)


def _describe(selection: Any) -> str:
    parts = selection if isinstance(selection, tuple) else (selection,)
    out = []
    for part in parts:
        if isinstance(part, slice):
            out.append(f"{'' if part.start is None else part.start}:{'' if part.stop is None else part.stop}")
        elif part is Ellipsis:
            out.append("...")
        else:
            out.append(str(part))
    return ", ".join(out)


# -- gentrace verify ------------------------------------------------------------------------------
@dataclass
class Damage:
    """One damaged piece: an array (or checkpoint), the inclusive row range (None: the whole array), why."""

    array: str
    rows: tuple[int, int] | None
    reason: str

    def __str__(self) -> str:
        where = "" if self.rows is None else f" {rows_text(*self.rows)}"
        return f"{self.array}{where}: {self.reason}"


@dataclass
class StreamReport:
    """What `verify` found in one stream (or in `data`, `checkpoints`)."""

    stream: str
    arrays: int = 0
    rows: int = 0
    chunks: int = 0  # chunk files read (shard files for compacted arrays)
    bytes: int = 0  # uncompressed
    damaged: list[Damage] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        """No damage found."""
        return not self.damaged


def read_blocks(array: zarr.Array, rows: int) -> Iterator[tuple[int, int, Exception | None]]:
    """Read rows [0, rows) of `array` in blocks; yield (first, last, error) per block, chunk by chunk on error."""
    chunk_rows = int(array.shards[0] if array.shards is not None else array.chunks[0])
    row_bytes = max(1, math.prod(array.shape[1:]) * np.dtype(array.dtype).itemsize)
    block = max(chunk_rows, (VERIFY_BLOCK_BYTES // row_bytes) // chunk_rows * chunk_rows)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        try:
            np.asarray(array[start:stop])
            yield start, stop - 1, None
        except Exception:  # noqa: BLE001 - find which chunks are damaged
            for first in range(start, stop, chunk_rows):
                last = min(stop, first + chunk_rows) - 1
                try:
                    np.asarray(array[first : last + 1])
                    yield first, last, None
                except Exception as exc:  # noqa: BLE001
                    yield first, last, exc


def reason_of(exc: Exception) -> str:
    """A one-line reason for a failed read, without the store path and the `verify` advice."""
    text = str(exc).split("; run `gentrace verify")[0]
    text = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"^\S*: ", "", text, count=1)[:200]
