"""Run the gentrace CLI with one fault injected at a chosen moment of a recording.

usage: python record_hooked.py MOMENT MARKER GENTRACE_ARGS...

The gentrace arguments go to `gentrace.cli.main()` unchanged (for example `record CONFIG --out
STORE --quiet`). MOMENT says where the fault strikes; `kill` moments SIGKILL this process
themselves, `pause` moments create the file MARKER and sleep until the test kills them:

    step:K         kill in the training thread right after optimizer step K, once params row 0
                   is committed on disk (so there is always something to resume from)
    torn:N         pause while params row N is half written: the step and half of its tensors
                   are on disk, the other tensors, the checkpoint and the commit are not
    checkpoint:N   kill in the writer thread after every chunk of params row N, before its checkpoint
    committed:N    kill in the writer thread right after params row N is committed
    finish         kill when the writer finishes: every row committed, arrays not yet resized,
                   status still `running`
    first-write    kill at the writer's first write: the store exists, nothing is committed
    bare-zarr      kill right after the store's root zarr.json is first written (status
                   `initializing`, no array yet)
    truncating     (for `record --resume`) kill once resume has lowered the committed counters,
                   before it clears the cut rows
    final-status   kill in the final close after every array was resized, just before the
                   atomic write of status `complete`
    compact:K      (for `compact`) kill right after the K-th rename of the compaction
    sigint-wait:K  after optimizer step K (params row 0 committed) create MARKER and wait for SIGINT
    wait-prepare   create MARKER before the data and models are built, then wait for SIGINT
    wait-create    create MARKER while the store is being created (Ctrl-C held), wait until the
                   test deletes MARKER, then finish creating it
    wait-close     create MARKER when the final close begins (Ctrl-C held), wait until the test
                   deletes MARKER, then close
    enospc:N       the disk is full after N more bytes: every later file write fails with ENOSPC
    hold:N         pause (holding the writer lock) right after params row N is committed
    slow:SECONDS   no fault: sleep SECONDS after every optimizer step (a run long enough to SIGINT)
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gentrace.cli import app as cli
from gentrace.record.recorder import Recorder
from gentrace.store import writer as writer_mod
from gentrace.store.writer import RowBlock, StoreWriter


def kill() -> None:
    """SIGKILL this very process: no cleanup, no flush, like a power cut of the process."""
    os.kill(os.getpid(), signal.SIGKILL)


def pause(marker: Path) -> None:
    """Tell the test the moment has come, then wait for its SIGKILL."""
    marker.touch()
    while True:
        time.sleep(1)


def holds_params_row(blocks: list[RowBlock], row: int) -> RowBlock | None:
    """The params block among `blocks` that holds `row`, if any."""
    for block in blocks:
        if block.stream == "params" and block.start <= row < block.start + block.rows:
            return block
    return None


def fill_disk(budget: int) -> None:
    """Make every file write fail with ENOSPC once `budget` more bytes were written (a disk filling up)."""
    import errno
    import pathlib

    import zarr.storage._local as local

    left = [budget]

    def spend(n: int, where: Any) -> None:
        left[0] -= n
        if left[0] < 0:
            raise OSError(errno.ENOSPC, "No space left on device", str(where))

    write_bytes, write_text, put, unlink = (
        pathlib.Path.write_bytes,
        pathlib.Path.write_text,
        local._put,
        pathlib.Path.unlink,
    )

    def freeing_unlink(self: Path, missing_ok: bool = False) -> None:
        size = self.stat().st_size if self.is_file() else 0
        unlink(self, missing_ok=missing_ok)
        left[0] += size  # deleting a file gives its room back, as on a real disk

    def full_write_bytes(self: Path, data: Any) -> int:
        spend(len(data), self)
        return write_bytes(self, data)

    def full_write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        spend(len(data), self)
        return write_text(self, data, *args, **kwargs)

    def full_put(path: Path, value: Any, exclusive: bool = False) -> int:
        spend(len(value.as_buffer_like()), path)
        return put(path, value, exclusive)

    pathlib.Path.write_bytes = full_write_bytes  # type: ignore[method-assign]
    pathlib.Path.write_text = full_write_text  # type: ignore[method-assign]
    local._put = full_put
    pathlib.Path.unlink = freeing_unlink  # type: ignore[method-assign]


def install(moment: str, marker: Path) -> None:
    """Monkeypatch gentrace so that `moment` happens."""
    name, _, arg = moment.partition(":")
    write_and_commit = StoreWriter._write_and_commit
    commit_written = StoreWriter._commit_written

    if name == "step":
        after_step = Recorder.after_step

        def after_step_then_kill(self: Recorder, info: Any) -> None:
            after_step(self, info)
            if info.step == int(arg):
                store = self._writer.path  # type: ignore[union-attr]
                while json.loads((store / "zarr.json").read_text())["attributes"]["committed"].get("params", 0) < 1:
                    time.sleep(0.005)
                kill()

        Recorder.after_step = after_step_then_kill  # type: ignore[method-assign]
    elif name == "torn":

        def write_half(self: StoreWriter, blocks: list[RowBlock]) -> None:
            block = holds_params_row(blocks, int(arg))
            if block is None:
                write_and_commit(self, blocks)
                return
            items = list(block.arrays.items())  # params/step first, then the tensors
            half = dataclasses.replace(block, arrays=dict(items[: 1 + (len(items) - 1) // 2]), checkpoint=None)
            self._commit_written = lambda blocks: pause(marker)  # type: ignore[method-assign]
            # The half row without its checkpoint would wait in the writer's tails; written now, as a
            # checkpoint row's chunks are (a flush), it lies on disk uncommitted.
            self._flush_next = True
            write_and_commit(self, [b if b is not block else half for b in blocks])

        StoreWriter._write_and_commit = write_half  # type: ignore[method-assign]
    elif name == "checkpoint":
        write_checkpoint = StoreWriter._write_checkpoint
        target: list[int] = []

        def note_row(self: StoreWriter, blocks: list[RowBlock]) -> None:
            block = holds_params_row(blocks, int(arg))
            if block is not None:
                target.append(block.checkpoint_step)
            write_and_commit(self, blocks)

        def kill_before_checkpoint(self: StoreWriter, payload: bytes, step: int) -> None:
            if step in target:
                kill()
            write_checkpoint(self, payload, step)

        StoreWriter._write_and_commit = note_row  # type: ignore[method-assign]
        StoreWriter._write_checkpoint = kill_before_checkpoint  # type: ignore[method-assign]
    elif name in ("committed", "hold"):

        def commit_then_stop(self: StoreWriter, blocks: list[RowBlock]) -> None:
            row = holds_params_row(blocks, int(arg))
            commit_written(self, blocks)
            if row is not None and name == "committed":
                kill()
            if row is not None:
                pause(marker)

        StoreWriter._commit_written = commit_then_stop  # type: ignore[method-assign]
    elif name == "finish":
        StoreWriter._finish = lambda self, item: kill()  # type: ignore[method-assign]
    elif name == "first-write":
        StoreWriter._write_and_commit = lambda self, blocks: kill() if blocks else None  # type: ignore[method-assign]
    elif name == "bare-zarr":
        write_root = writer_mod.rootmeta.write

        def write_then_kill(path: Path, meta: Any) -> None:
            write_root(path, meta)
            kill()

        writer_mod.rootmeta.write = write_then_kill  # type: ignore[attr-defined]
    elif name == "truncating":
        StoreWriter._clear_rows = lambda self, path, first: kill()  # type: ignore[method-assign]
    elif name == "final-status":
        write_attrs = StoreWriter.write_attrs

        def write_attrs_unless_complete(self: StoreWriter, updates: Any) -> None:
            if updates.get("status") == "complete":
                kill()
            write_attrs(self, updates)

        StoreWriter.write_attrs = write_attrs_unless_complete  # type: ignore[method-assign]
    elif name == "compact":
        rename = Path.rename
        calls = [0]

        def rename_then_kill(self: Path, target: Any) -> Any:
            moved = rename(self, target)
            calls[0] += 1
            if calls[0] == int(arg):
                kill()
            return moved

        Path.rename = rename_then_kill  # type: ignore[method-assign]
    elif name == "sigint-wait":
        after_step = Recorder.after_step

        def after_step_then_wait(self: Recorder, info: Any) -> None:
            after_step(self, info)
            if info.step == int(arg):
                store = self._writer.path  # type: ignore[union-attr]
                while json.loads((store / "zarr.json").read_text())["attributes"]["committed"].get("params", 0) < 1:
                    time.sleep(0.005)
                marker.touch()
                while True:  # Ctrl-C raises KeyboardInterrupt out of this sleep
                    time.sleep(0.05)

        Recorder.after_step = after_step_then_wait  # type: ignore[method-assign]
    elif name == "wait-prepare":
        from gentrace.training import run

        def prepare_after_sigint(*args: Any, **kwargs: Any) -> Any:
            marker.touch()
            while True:  # Ctrl-C raises KeyboardInterrupt out of this sleep
                time.sleep(0.05)

        run.prepare = prepare_after_sigint  # type: ignore[assignment]
    elif name == "wait-create":
        declare = StoreWriter.declare

        def declare_when_told(self: StoreWriter, streams: Any) -> None:
            if not marker.exists() and not (self.path / "params").exists():
                marker.touch()
                while marker.exists():
                    time.sleep(0.01)
            declare(self, streams)

        StoreWriter.declare = declare_when_told  # type: ignore[method-assign]
    elif name == "wait-close":
        close = StoreWriter.close

        def close_when_told(self: StoreWriter, status: str, *args: Any, **kwargs: Any) -> None:
            if status == "complete":
                marker.touch()
                while marker.exists():
                    time.sleep(0.01)
            close(self, status, *args, **kwargs)

        StoreWriter.close = close_when_told  # type: ignore[method-assign]
    elif name == "enospc":
        fill_disk(int(arg))
    elif name == "slow":
        after_step = Recorder.after_step

        def after_step_slowly(self: Recorder, info: Any) -> None:
            after_step(self, info)
            time.sleep(float(arg))

        Recorder.after_step = after_step_slowly  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown moment {moment!r}")


if __name__ == "__main__":
    moment, marker, *args = sys.argv[1:]
    install(moment, Path(marker))
    sys.argv = ["gentrace", *args]
    cli.main()
