"""Checks before anything is built, allocated or deleted: the store path is usable and the run fits the machine.

`record --out afile/x.zarr` (a file where a directory should be), `--out /proc/x.zarr` (a file system that
takes no directories), a read-only mount or a directory without write permission: each used to fail deep
inside zarr or shutil with a traceback, after the data and models were built, and `--overwrite` could have
deleted part of the old store by then. `record`, `compact` and `sweep_dir` run first and raise ConfigError
(exit 2) naming the path and the fix; `record` also refuses a run too large for this machine
(gentrace.task.budget). They only read the file system, except `new_store`'s probe: a uniquely named empty
directory, removed at once.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from gentrace.core.config import RunConfig
from gentrace.core.errors import ConfigError, GentraceError
from gentrace.store.reader import check_gentrace_store
from gentrace.task import budget

PROBE_PREFIX = ".gentrace-probe-"


def _nearest_existing(path: Path) -> Path:
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def why_not_writable(directory: Path) -> str | None:
    """None when files can be created in `directory`, else the reason (read-only file system, permission denied)."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except OSError:
        pass
    if not os.access(directory, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None


def new_store(out: Path, option: str = "--out") -> None:
    """A new store (or sweep directory) can be created at `out`: its nearest existing ancestor is a writable directory.

    Raises:
        ConfigError: a file is in the way, or the directory is read-only, not ours, or takes no new directories.
    """
    ancestor = _nearest_existing(out.parent)
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {out}: {ancestor} is a file, not a directory; give a path inside a directory")
    why = why_not_writable(ancestor)
    if why is None:
        try:  # what os.access cannot tell: /proc, /sys and similar file systems take no new directories
            os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=ancestor))
        except OSError as exc:
            why = exc.strerror or str(exc)
    if why is not None:
        raise ConfigError(
            f"{option} {out}: cannot create it in {ancestor} ({why}); give a path on a writable file system"
        )


def existing_store(store: Path, action: str, *, parent: bool = False) -> None:
    """Every directory of `store` can be written (resume, compact and overwrite change or delete files in all of them).

    Args:
        store: an existing store directory.
        action: what is refused, for the message: "resume", "compact", "overwrite".
        parent: also the directory holding `store` (compaction stages a sibling; overwriting removes the store).

    Raises:
        ConfigError: naming the first directory that cannot be written and the fix.
    """
    directories = [Path(os.path.abspath(store)).parent] if parent else []
    directories.append(Path(store))
    for root, subdirs, _ in os.walk(store):
        directories += [Path(root) / d for d in subdirs]
    fix = "give a writable --out" if action == "overwrite" else "copy the store to a writable place and use the copy"
    for directory in directories:
        why = why_not_writable(directory)
        if why is not None:
            what = "it" if directory == Path(store) else str(directory)
            raise ConfigError(f"cannot {action} {store}: {what} is not writable ({why}); {fix}")


def record(cfg: RunConfig | None, out: Path | None, *, device: str, resume: bool, overwrite: bool) -> None:
    """`gentrace record`: the store at `out` can be created, replaced or resumed, and the run fits this machine.

    Anything else wrong with the path (it exists, is not a store, is locked) is left to `run.record`,
    which says so in its own words.
    """
    if resume:
        if out is None or overwrite:
            return
        try:
            done = check_gentrace_store(out).get("status") == "complete"  # resuming it writes nothing
        except GentraceError:
            return
        if not done:
            existing_store(out, "resume")
        return
    assert cfg is not None
    target = out if out is not None else Path("runs") / f"{cfg.name}.zarr"  # where the default store goes
    if target.exists():
        if not overwrite:
            return
        try:
            check_gentrace_store(target)
        except GentraceError:
            return
        existing_store(target, "overwrite", parent=True)
    else:
        new_store(target, "--out" if out is not None else "the default store directory")
    fits(cfg, target, device)


def fits(cfgs: RunConfig | list[RunConfig], out: Path, device: str) -> None:
    """The run (or a sweep's new runs) fits this machine's memory and the disk at `out` (gentrace.task.budget).

    First as a GPU run, which holds less on the host: an absurd size is refused without importing torch
    (which `--device auto` needs to tell whether there is a GPU).
    """
    many = cfgs if isinstance(cfgs, list) else [cfgs]
    budget.check_many(many, out, gpu=True)
    if not budget.uses_gpu(device):
        budget.check_many(many, out, gpu=False)


def compact(store: Path) -> None:
    """`gentrace compact`: every directory of the store, and the one holding it (the staging sibling), is writable."""
    try:
        check_gentrace_store(store)
    except GentraceError:
        return  # compact says what is wrong with it
    existing_store(store, "compact", parent=True)


def sweep_dir(out: Path) -> None:
    """`gentrace sweep --out DIR`: DIR can be created, or is a writable directory."""
    if not out.exists():
        new_store(out, "--out")
    elif out.is_dir():
        why = why_not_writable(out)
        if why is not None:
            raise ConfigError(f"--out {out}: cannot write in it ({why}); give a writable directory for the sweep")
