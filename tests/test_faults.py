"""Issue 12's fault campaign, sized for CI: store damage, a full disk, kills of a compaction, Ctrl-C at
the edges of a recording, and a reader's lock probe racing a writer.

Every damage must give one `error:` line naming the array and row (never exit 0 with numbers), and
`gentrace verify` must list it; a full disk ends with status `failed` and a message naming the file,
and `--resume` finishes the run once there is room; every killed compaction finishes when rerun.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    assert_committed_rows_filled,
    concurrently,
    one_error_line,
    run_cli,
    start_cli,
    store_attrs,
    tiny_config,
    wait_until,
)

from gentrace.store.integrity import rows_text
from gentrace.store.lock import StoreLock, is_locked
from gentrace.store.reader import StoreReader


def _rows_per_chunk(store: Path, array: str) -> int:
    return int(json.loads((store / array / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"][0])


def _chunk(store: Path, array: str, row: int) -> Path:
    """The chunk file holding `row` (a chunk may hold several rows)."""
    index = row // _rows_per_chunk(store, array)
    files = sorted((store / array).glob(f"c.{index}.*")) or sorted((store / array).glob(f"c.{index}"))
    assert files, f"no chunk file of {array} row {row}"
    return files[0]


def damaged_rows(store: Path, array: str, row: int) -> str:
    """How an error names the rows of the chunk holding `row`: `row 2`, or `rows 0..11` of a chunk of several."""
    per = _rows_per_chunk(store, array)
    first = row // per * per
    committed = store_attrs(store)["committed"][array.split("/")[0]]
    return rows_text(first, min(first + per, committed) - 1)


def delete_chunk(store: Path, array: str, row: int) -> None:
    _chunk(store, array, row).unlink()


def truncate_chunk(store: Path, array: str, row: int) -> None:
    path = _chunk(store, array, row)
    path.write_bytes(path.read_bytes()[:10])


def flip_byte(store: Path, array: str, row: int) -> None:
    path = _chunk(store, array, row)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def garbage_metadata(store: Path, array: str, row: int) -> None:
    (store / array / "zarr.json").write_text("{ not json")


def delete_root(store: Path, array: str, row: int) -> None:
    (store / "zarr.json").unlink()


def delete_checkpoint(store: Path, array: str, row: int) -> None:
    step = store_attrs(store)["checkpoint_step"]
    shutil.rmtree(store / "checkpoints" / f"step-{step:010d}")


DAMAGE: dict[str, Callable[[Path, str, int], None]] = {
    "delete-chunk": delete_chunk,
    "truncate-chunk": truncate_chunk,
    "flip-byte": flip_byte,
    "garbage-array-zarr-json": garbage_metadata,
    "delete-root-zarr-json": delete_root,
    "delete-checkpoint": delete_checkpoint,
}
# Each analysis, an array it reads and the row whose chunk is damaged (the error names that chunk's rows).
ANALYSES: dict[str, tuple[list[str], str, int]] = {
    "gsnr": (["analyze", "gsnr"], "grad/0.weight/sum", 2),
    "osgr": (["analyze", "osgr"], "grad/0.weight/sumsq", 2),
    "paths": (["analyze", "paths", "--kind", "self"], "acts/1/bits", 2),
    "trajectory": (["analyze", "trajectory"], "params_fine/0.bias", 0),
    "lipschitz": (["analyze", "lipschitz", "--where", "train"], "params/0.weight", 2),
    "mi": (["analyze", "mi", "--summary"], "preds/test", 2),
}
ROW = 2


@dataclass
class Damaged:
    analyses: dict[str, Any]
    verify: Any


def damage_and_analyze(kind: str, reference: Path, tmp: Path) -> Damaged:
    outcomes = {}
    for name, (command, array, chunk) in ANALYSES.items():
        store = tmp / f"{kind}-{name}.zarr"
        shutil.copytree(reference, store)
        DAMAGE[kind](store, array, chunk)
        outcomes[name] = (array, damaged_rows(reference, array, chunk), run_cli(*command, store))
    store = tmp / f"{kind}-verify.zarr"
    shutil.copytree(reference, store)
    DAMAGE[kind](store, "grad/0.weight/sum", ROW)
    return Damaged(outcomes, (store, run_cli("verify", store, "--quiet")))


@pytest.fixture(scope="module")
def osgr_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY on digits (classes: mi), two replicates evaluated at every step (osgr), recorded once."""
    tmp = tmp_path_factory.mktemp("faults-reference")
    store = tmp / "ref.zarr"
    cfg = tiny_config(
        tmp,
        data={"name": "digits", "n_train": 100, "n_test": 100},
        train={"replicates": 2, "loss": "cross_entropy"},
        record={"eval_every_steps": 1},
    )
    done = run_cli("record", cfg, "--out", store, "--quiet")
    assert done.returncode == 0, done.stderr
    return store


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, osgr_reference: Path) -> dict[str, Future[Damaged]]:
    tmp = tmp_path_factory.mktemp("damage")
    return concurrently({kind: partial(damage_and_analyze, kind, osgr_reference, tmp) for kind in DAMAGE})


def test_the_undamaged_store_analyzes_and_verifies(osgr_reference: Path) -> None:
    for command, *_ in ANALYSES.values():
        done = run_cli(*command, osgr_reference)
        assert done.returncode == 0, (command, done.stderr)
    done = run_cli("verify", osgr_reference, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "damaged" not in done.stdout


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_one_error_line_from_every_analysis(kind: str, damaged: dict[str, Future[Damaged]]) -> None:
    for name, (array, rows, done) in damaged[kind].result().analyses.items():
        line = one_error_line(done.stderr)
        assert done.returncode in (1, 2), (name, done.stderr)
        if kind in ("delete-chunk", "truncate-chunk", "flip-byte"):
            assert done.returncode == 1, (name, line)
            assert array in line, (name, line)
            assert rows in line, (name, line)
            assert "gentrace verify" in line, (name, line)
        if kind == "garbage-array-zarr-json":
            assert f"{array}/zarr.json" in line, (name, line)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_verify_names_the_damaged_row(kind: str, damaged: dict[str, Future[Damaged]]) -> None:
    store, done = damaged[kind].result().verify
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    if kind in ("delete-chunk", "truncate-chunk", "flip-byte"):
        named = f"grad/0.weight/sum {damaged_rows(store, 'grad/0.weight/sum', ROW)}"
        assert any(named in line for line in lines), done.stderr
    if kind == "delete-checkpoint":
        assert any("checkpoints/step-" in line for line in lines), done.stderr


# -- a full disk ---------------------------------------------------------------------------------
@dataclass
class DiskFull:
    full: Any
    store: Path
    copy: Path
    still_full: Any
    resumed: Any
    at_creation: Any
    creation_store: Path
    creation_resumed: Any


def fill_the_disk(tmp: Path) -> DiskFull:
    cfg = tiny_config(tmp)
    store = tmp / "full.zarr"
    # 150 kB of the ~350 kB the run needs: the store is created and a few rows are committed, then it is full.
    full = start_cli("enospc:150000", tmp / "m", "record", cfg, "--out", store, "--quiet", driver="record_hooked.py")
    out, err = full.communicate(timeout=120)
    copy = tmp / "as-full.zarr"
    shutil.copytree(store, copy)
    still = start_cli("enospc:0", tmp / "m", "record", "--resume", "--out", store, "--quiet", driver="record_hooked.py")
    s_out, s_err = still.communicate(timeout=120)
    resumed = run_cli("record", "--resume", "--out", store, "--quiet")
    early = tmp / "full-at-creation.zarr"
    at = start_cli("enospc:3000", tmp / "m", "record", cfg, "--out", early, "--quiet", driver="record_hooked.py")
    a_out, a_err = at.communicate(timeout=120)
    early_resumed = run_cli("record", "--resume", "--out", early, "--quiet")
    return DiskFull(
        (full.returncode, out, err),
        store,
        copy,
        (still.returncode, s_out, s_err),
        resumed,
        (at.returncode, a_out, a_err),
        early,
        early_resumed,
    )


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory: pytest.TempPathFactory) -> DiskFull:
    return fill_the_disk(tmp_path_factory.mktemp("enospc"))


def test_disk_full_fails_the_run_naming_the_file_and_keeps_committed_rows(disk_full: DiskFull) -> None:
    rc, out, err = disk_full.full
    line = one_error_line(err)
    assert rc == 1, err
    assert out == ""
    assert "the disk is full" in line
    assert f"{disk_full.store}/" in line  # the file being written
    assert " free" in line
    assert "--resume" in line
    attrs = store_attrs(disk_full.copy)
    assert attrs["status"] == "failed"
    assert "the disk is full" in attrs["error"]
    assert attrs["committed"]["params"] >= 1
    assert_committed_rows_filled(disk_full.copy)
    assert run_cli("verify", disk_full.copy, "--quiet").returncode == 0


def test_resume_on_a_still_full_disk_is_one_line(disk_full: DiskFull) -> None:
    rc, out, err = disk_full.still_full
    line = one_error_line(err)
    assert rc == 1, err
    assert "the disk is full" in line


def test_resume_after_the_disk_full_reaches_the_uninterrupted_run(disk_full: DiskFull, reference_store: Path) -> None:
    assert disk_full.resumed.returncode == 0, disk_full.resumed.stderr
    _assert_equal_stores(disk_full.store, reference_store)


def test_disk_full_while_the_store_is_created(disk_full: DiskFull, reference_store: Path) -> None:
    rc, out, err = disk_full.at_creation
    line = one_error_line(err)
    assert rc == 1, err
    assert "the disk is full" in line
    assert disk_full.creation_resumed.returncode == 0, disk_full.creation_resumed.stderr
    _assert_equal_stores(disk_full.creation_store, reference_store)


def _assert_equal_stores(store: Path, reference: Path) -> None:
    final, expected = StoreReader(store), StoreReader(reference)
    assert final.status == "complete"
    assert final.attrs["committed"] == expected.attrs["committed"]
    for paths in expected.streams().values():
        for path in paths:
            assert np.array_equal(final.array(path), expected.array(path)), path


# -- kills of a compaction -----------------------------------------------------------------------
COMPACT_KILLS = {"after-first-park": 1, "after-first-swap": 2, "mid-array-3": 5}


def kill_compaction(k: int, reference: Path, tmp: Path) -> tuple[Any, Any, Any, Any, Path]:
    store = tmp / f"compact-{k}.zarr"
    shutil.copytree(reference, store)
    killed = start_cli(f"compact:{k}", tmp / "m", "compact", store, "--quiet", driver="record_hooked.py")
    killed.communicate(timeout=120)
    info = run_cli("info", store)
    verify = run_cli("verify", store, "--quiet")  # a half-compacted store reads whole (recovered by compact)
    again = run_cli("compact", store, "--quiet")
    return killed.returncode, info, verify, again, store


@pytest.fixture(scope="module")
def compactions(tmp_path_factory: pytest.TempPathFactory, one_row_store: Path) -> dict[str, Future[Any]]:
    tmp = tmp_path_factory.mktemp("compact-kill")
    return concurrently({name: partial(kill_compaction, k, one_row_store, tmp) for name, k in COMPACT_KILLS.items()})


@pytest.mark.parametrize("name", list(COMPACT_KILLS))
def test_a_killed_compaction_finishes_when_rerun(
    name: str, compactions: dict[str, Future[Any]], one_row_store: Path
) -> None:
    rc, info, verify, again, store = compactions[name].result()
    assert rc == -signal.SIGKILL
    assert info.returncode == 0, info.stderr
    assert "compacting" in info.stdout
    assert again.returncode == 0, again.stderr
    assert run_cli("verify", store, "--quiet").returncode == 0
    assert store_attrs(store)["compacted"]
    _assert_equal_stores(store, one_row_store)


# -- Ctrl-C at the edges of a recording ----------------------------------------------------------
def test_sigint_before_the_store_exists_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """Ctrl-C while torch imports / data are built: exit 130, one line, no store."""
    store, marker = tmp_path / "never.zarr", tmp_path / "preparing"
    proc = start_cli(
        "wait-prepare", marker, "record", tiny_config(tmp_path), "--out", store, "--quiet", driver="record_hooked.py"
    )
    wait_until(marker.exists, proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    line = one_error_line(err)
    assert proc.returncode == 130
    assert out == ""
    assert "interrupted" in line
    assert not store.exists()


def test_sigint_during_the_final_close_marks_interrupted_and_resumes(tmp_path: Path, reference_store: Path) -> None:
    store, marker = tmp_path / "closing.zarr", tmp_path / "closing"
    proc = start_cli(
        "wait-close", marker, "record", tiny_config(tmp_path), "--out", store, "--quiet", driver="record_hooked.py"
    )
    wait_until(marker.exists, proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C changes nothing
    marker.unlink()  # the signals are delivered before the driver can see this
    out, err = proc.communicate(timeout=120)
    line = one_error_line(err)
    assert proc.returncode == 130
    assert "interrupted" in line
    assert store_attrs(store)["status"] == "interrupted"
    resumed = run_cli("record", "--resume", "--out", store, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    _assert_equal_stores(store, reference_store)


# -- the lock ------------------------------------------------------------------------------------
def test_a_readers_lock_probe_never_makes_a_writer_fail(tmp_path: Path) -> None:
    """`info`/`analyze` probe the flock while a writer takes it: the writer must never see it as taken."""
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            is_locked(tmp_path)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(2000):
            lock = StoreLock(tmp_path)
            lock.acquire()
            lock.release()
    finally:
        stop.set()
        prober.join()


# -- a damaged checkpoint ------------------------------------------------------------------------
def test_resume_with_a_damaged_newest_checkpoint_falls_back_and_destroys_nothing(
    tmp_path: Path, reference_store: Path
) -> None:
    store, marker = tmp_path / "ck.zarr", tmp_path / "m"
    killed = start_cli(
        "step:17", marker, "record", tiny_config(tmp_path), "--out", store, "--quiet", driver="record_hooked.py"
    )
    killed.communicate(timeout=120)
    attrs = store_attrs(store)
    newest = attrs["checkpoint_step"]
    chunk = store / "checkpoints" / f"step-{newest:010d}" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x01
    chunk.write_bytes(bytes(data))
    resumed = run_cli("record", "--resume", "--out", store, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("warning:") == 1, resumed.stderr
    assert f"step {newest}" in resumed.stderr
    _assert_equal_stores(store, reference_store)


def test_resume_with_every_checkpoint_damaged_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    store, marker = tmp_path / "ck.zarr", tmp_path / "m"
    killed = start_cli(
        "step:17", marker, "record", tiny_config(tmp_path), "--out", store, "--quiet", driver="record_hooked.py"
    )
    killed.communicate(timeout=120)
    for chunk in (store / "checkpoints").glob("step-*/c.0"):
        chunk.write_bytes(b"not a checkpoint")
    before = store_attrs(store)["committed"]
    resumed = run_cli("record", "--resume", "--out", store, "--quiet")
    line = one_error_line(resumed.stderr)
    assert resumed.returncode in (1, 2)
    assert "checkpoint" in line
    assert store_attrs(store)["committed"] == before


def test_sigint_while_the_store_is_created_marks_it_interrupted_and_resumes(
    tmp_path: Path, reference_store: Path
) -> None:
    """Ctrl-C inside store creation waits for the store to be whole (no zarr coroutine noise), then stops."""
    store, marker = tmp_path / "creating.zarr", tmp_path / "creating"
    proc = start_cli(
        "wait-create", marker, "record", tiny_config(tmp_path), "--out", store, "--quiet", driver="record_hooked.py"
    )
    wait_until(marker.exists, proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    marker.unlink()
    out, err = proc.communicate(timeout=120)
    line = one_error_line(err)
    assert proc.returncode == 130
    assert out == ""
    assert "interrupted" in line
    assert store_attrs(store)["status"] == "interrupted"
    resumed = run_cli("record", "--resume", "--out", store, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    _assert_equal_stores(store, reference_store)


def test_a_sweep_point_killed_while_its_store_was_created_is_recorded_when_the_sweep_reruns(tmp_path: Path) -> None:
    cfg, out, marker = tiny_config(tmp_path), tmp_path / "sweep", tmp_path / "m"
    args = ["sweep", cfg, "--grid", "data.seed=0,1", "--out", out, "--quiet", "--device", "cpu"]
    killed = start_cli("bare-zarr", marker, *args, driver="record_hooked.py")
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    stores = sorted(out.glob("*.zarr"))
    assert len(stores) == 2
    for store in stores:
        assert StoreReader(store).status == "complete", store
