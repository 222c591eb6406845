"""Background store writer, read-only reader and the schema both follow (NumPy and zarr only, no torch).

`from gentrace.store import StoreReader` is gentrace.store.reader.StoreReader (also `gentrace.open(path)`),
imported on first use so that `gentrace.store.schema` does not load zarr.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StoreReader"]


def __getattr__(name: str) -> Any:
    """`StoreReader`, imported on first use."""
    if name == "StoreReader":
        from gentrace.store.reader import StoreReader

        return StoreReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
