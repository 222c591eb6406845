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
    bare-zarr      kill right after the call that creates the store's zarr.json (before
                   gentrace writes its attributes in a second call)
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

import zarr

from gentrace import cli
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
        open_group = zarr.open_group

        def open_then_kill(store: Any, *args: Any, **kwargs: Any) -> Any:
            meta = Path(getattr(store, "root", store)) / "zarr.json"
            existed = meta.exists()
            group = open_group(store, *args, **kwargs)
            if not existed and meta.exists():  # this call created the store
                kill()
            return group

        writer_mod.zarr.open_group = open_then_kill  # type: ignore[attr-defined]
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
