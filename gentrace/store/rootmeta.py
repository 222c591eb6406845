"""The root `zarr.json` of a store: read it, and change its attributes in one atomic rewrite.

Every state change of a store (status, committed counters, the checkpoint resumed from, the
compaction flag) is one call of `update_attrs`: the whole new file is written next to the old one
and renamed over it, so a reader or a kill sees either the old attributes or the new ones, never
half of a change (zarr's `attrs.update` rewrites the file once per key). The store's writer is
the only process that calls it (it holds the store lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT_META = "zarr.json"


def read(path: Path) -> dict[str, Any]:
    """The parsed root `zarr.json` of the store directory `path` (raises OSError, ValueError)."""
    parsed = json.loads((Path(path) / ROOT_META).read_text())
    if not isinstance(parsed, dict):
        raise ValueError("the root zarr.json is not a JSON object")
    return parsed


def update_attrs(path: Path, updates: Mapping[str, Any], *, last_resort: bool = False) -> dict[str, Any]:
    """Merge `updates` into the root attributes in one atomic file replacement; returns the new attributes.

    `last_resort` (the status `failed` of a writer that is giving up) allows the in-place rewrite
    of `write` on a full disk.
    """
    meta = read(path)
    attributes = dict(meta.get("attributes", {}))
    attributes.update(updates)
    meta["attributes"] = attributes
    write(path, meta, last_resort=last_resort, reserve=RESERVE_BYTES)
    return attributes


RESERVE_BYTES = 4096


def write(path: Path, meta: Mapping[str, Any], *, last_resort: bool = False, reserve: int = 0) -> None:
    """Replace the root `zarr.json` with `meta` atomically (temporary file in the same directory, then rename).

    An OSError names the file; the temporary file is removed on failure (a full disk leaves nothing).
    On a full disk, with `last_resort`, the file is rewritten in place in its compact JSON form when
    that is no longer than the file already is (no new blocks needed), so that the status `failed`
    and its reason still reach the store; that one rewrite is a single write() of a few kB.
    """
    target = Path(path) / ROOT_META
    tmp = Path(path) / f"{ROOT_META}.{uuid.uuid4().hex}.partial"
    # Compact, so the C encoder writes it (an indented dump runs in Python: ~2 ms a commit for a large
    # config), then `reserve` spaces (JSON whitespace): room for the last-resort in-place rewrite of a
    # full disk, which must not be longer than the file already is. The store's first document has none
    # (it must fit where a store can just be created); every update after it keeps RESERVE_BYTES.
    text = json.dumps(meta, separators=(",", ":")) + "\n" + " " * reserve
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if (
            last_resort
            and exc.errno == errno.ENOSPC
            and _rewrite_in_place(target, json.dumps(meta, separators=(",", ":")))
        ):
            return
        raise OSError(exc.errno or errno.EIO, exc.strerror or str(exc), str(target)) from None


def _rewrite_in_place(target: Path, text: str) -> bool:
    data = text.encode()
    try:
        if not target.exists() or len(data) > target.stat().st_size:
            return False
        with open(target, "r+b") as f:
            f.write(data)
            f.truncate()
    except OSError:
        return False
    return True
