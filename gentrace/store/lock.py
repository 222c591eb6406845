"""Single-writer lock for a local store: an flock on the store directory itself.

An flock is released by the kernel when its process dies, SIGKILL included, so a killed run
never leaves a stale lock behind and `--resume` can take it over at once. Locking the directory
rather than a lock file inside it keeps the store free of non-Zarr files (plain `zarr.open_group`
would warn about each one); the holder is named in the root attr `writer_process`.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from gentrace.core.errors import StoreError

# How long `acquire` keeps trying while the lock is held (a live writer holds it for good; a
# reader's probe for microseconds).
ACQUIRE_PATIENCE_S = 1.0


class StoreLock:
    """Exclusive, non-blocking lock on one store directory; `release()` or process exit frees it."""

    def __init__(self, store_path: Path) -> None:
        self.path = Path(store_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StoreError naming the store.

        A reader's `is_locked` probe holds a shared lock for a few microseconds; the attempt is
        retried for up to ACQUIRE_PATIENCE_S so that a probe is never mistaken for a live writer.
        """
        fd = os.open(self.path, os.O_RDONLY)
        deadline = time.monotonic() + ACQUIRE_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.002)
                    continue
                os.close(fd)
                raise StoreError(
                    f"{self.path} is being written by another gentrace process; wait for it to finish or stop it first"
                ) from None
        self._fd = fd

    def release(self) -> None:
        """Free the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def is_locked(store_path: Path) -> bool:
    """Whether a live process holds the writer lock (used by `info` to tell a killed run from a live one)."""
    path = Path(store_path)
    if not path.is_dir():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
