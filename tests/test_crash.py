"""SIGKILL a recording at many moments (SPEC sections 3 and 7): the store stays readable up to the
last committed row, and `record --resume` reaches exactly the parameters of an uninterrupted run.

Each moment is made deterministic by tests/drivers/record_hooked.py, which runs the real CLI with
one gentrace method wrapped to kill the process (or to pause until this test kills it).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import (
    assert_committed_rows_filled,
    concurrently,
    one_error_line,
    run_cli,
    start_cli,
    store_attrs,
    tiny_config,
    tree_digest,
)

from gentrace.store.reader import StoreReader

# TINY: 4 epochs of 5 steps; params rows 0..4 at steps 0, 5, 10, 15, 20, each with a checkpoint.
MOMENTS = {
    # id: driver moment; `torn` pauses and is killed from here, every other one kills itself.
    "step-2-only-init-committed": "step:2",
    "params-row-1-just-committed": "committed:1",
    "params-row-2-half-written": "torn:2",
    "params-row-3-before-its-checkpoint": "checkpoint:3",
    "step-17-mid-last-epoch": "step:17",
    "writer-finishing": "finish",
}


@dataclass
class Crash:
    """One killed run: its exit code, a copy of the store as the kill left it, then what info and resume did."""

    killed_rc: int
    killed_err: str
    killed: Path
    store: Path
    info: subprocess.CompletedProcess[str]
    resume: subprocess.CompletedProcess[str]


@dataclass
class EarlyCrash:
    """A run killed before anything was committed, then resumed, then recorded again with --overwrite."""

    killed_rc: int
    killed_err: str
    store: Path
    digest: dict[str, bytes]
    info: subprocess.CompletedProcess[str]
    resume: subprocess.CompletedProcess[str]
    digest_after_resume: dict[str, bytes]
    overwrite: subprocess.CompletedProcess[str]


def kill_at(moment: str, cfg: Path, store: Path, timeout: float = 120) -> tuple[int, str]:
    """Record `cfg` into `store` and SIGKILL it at `moment`; returns the process's exit code and stderr."""
    marker = store.with_suffix(".marker")
    proc = start_cli(moment, marker, "record", cfg, "--out", store, "--quiet", driver="record_hooked.py")
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()  # SIGKILL
        assert marker.exists(), f"{moment} never came within {timeout} s"
    _, err = proc.communicate()
    return proc.returncode, err


def crash(moment: str, cfg: Path, store: Path) -> Crash:
    rc, err = kill_at(moment, cfg, store)
    killed = store.with_name(f"{store.stem}-as-killed.zarr")
    shutil.copytree(store, killed)
    info = run_cli("info", store)
    return Crash(rc, err, killed, store, info, run_cli("record", "--resume", "--out", store, "--quiet"))


def early_crash(moment: str, cfg: Path, store: Path) -> EarlyCrash:
    rc, err = kill_at(moment, cfg, store)
    digest = tree_digest(store)
    info = run_cli("info", store)
    resume = run_cli("record", "--resume", "--out", store, "--quiet")
    after = tree_digest(store)
    overwrite = run_cli("record", cfg, "--overwrite", "--out", store, "--quiet")
    return EarlyCrash(rc, err, store, digest, info, resume, after, overwrite)


EARLY = {"first-write": "first-write", "bare-zarr": "bare-zarr"}


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory, reference_store: Path) -> dict[str, Future[Any]]:
    """Every moment killed, copied, `info`-ed and resumed; every early kill too (a few at a time)."""
    tmp = tmp_path_factory.mktemp("crash")
    cfg = tiny_config(tmp)
    jobs: dict[str, Callable[[], Any]] = {}
    for name, moment in EARLY.items():
        jobs[name] = partial(early_crash, moment, cfg, tmp / f"{name}.zarr")
    for name, moment in MOMENTS.items():
        jobs[name] = partial(crash, moment, cfg, tmp / f"{name}.zarr")
    return concurrently(jobs)


@pytest.fixture(params=list(MOMENTS))
def crashed(request: pytest.FixtureRequest, crashes: dict[str, Future[Any]]) -> Crash:
    """The run killed at one moment."""
    result: Crash = crashes[request.param].result()
    assert result.killed_rc == -signal.SIGKILL, f"the run ended before the moment to kill it:\n{result.killed_err}"
    return result


def test_killed_store_opens_with_plain_zarr(crashed: Crash) -> None:
    root = zarr.open_group(crashed.killed, mode="r")
    assert "params" in root
    assert root.attrs["status"] == "running"


def test_info_lists_every_stream_of_a_killed_store(crashed: Crash) -> None:
    assert crashed.info.returncode == 0, crashed.info.stderr
    assert re.search(r"^status\s+killed", crashed.info.stdout, re.MULTILINE)
    streams = store_attrs(crashed.killed)["streams"]
    assert set(streams) == {"metrics", "metrics_fine", "params", "params_fine", "preds", "grad", "acts"}
    for stream in streams:
        assert re.search(rf"^{stream}\s+\d+", crashed.info.stdout, re.MULTILINE), stream


def test_committed_rows_of_a_killed_store_hold_no_fill_values(crashed: Crash) -> None:
    assert store_attrs(crashed.killed)["committed"]["params"] >= 1
    assert_committed_rows_filled(crashed.killed)


def test_resume_reaches_the_uninterrupted_run_exactly(crashed: Crash, reference_store: Path) -> None:
    assert crashed.resume.returncode == 0, crashed.resume.stderr
    assert crashed.resume.stdout.strip() == str(crashed.store)
    final, reference = StoreReader(crashed.store), StoreReader(reference_store)
    assert final.status == "complete"
    assert final.attrs["committed"] == reference.attrs["committed"]
    assert final.streams() == reference.streams()
    root = zarr.open_group(crashed.store, mode="r")
    for stream, paths in reference.streams().items():
        for path in paths:
            assert root[path].shape[0] == final.committed(stream), f"{path} not resized to its committed rows"
            assert np.array_equal(final.array(path), reference.array(path)), path
    for path in (p for p in reference.array_paths() if p.startswith("data/")):
        assert np.array_equal(final.array(path), reference.array(path)), path


def test_half_written_row_is_on_disk_but_invisible(crashes: dict[str, Future[Any]]) -> None:
    """The torn moment really tears: row 2 of some tensors is on disk, yet readers stop before it."""
    killed = crashes["params-row-2-half-written"].result().killed
    reader = StoreReader(killed)
    rows = reader.committed("params")
    assert 1 <= rows <= 2  # row 1 is uncommitted too if the writer batched it with row 2
    root = zarr.open_group(killed, mode="r")
    names = reader.tensor_names("params")
    written = [n for n in names if np.isfinite(root[f"params/{n}"][2]).all()]
    assert 0 < len(written) < len(names)
    for name in names:
        assert len(reader.array(f"params/{name}")) == rows


def test_kill_before_the_first_snapshot(crashes: dict[str, Future[Any]]) -> None:
    """Nothing committed: `--resume` says so in one line (exit 2); the `--overwrite` it suggests starts over."""
    run: EarlyCrash = crashes["first-write"].result()
    assert run.killed_rc == -signal.SIGKILL, run.killed_err
    assert run.info.returncode == 0, run.info.stderr
    assert re.search(r"^params\s+0\s", run.info.stdout, re.MULTILINE)
    line = one_error_line(run.resume.stderr)
    assert run.resume.returncode == 2
    assert run.resume.stdout == ""
    assert str(run.store) in line
    assert "--overwrite" in line
    assert run.digest_after_resume == run.digest
    assert run.overwrite.returncode == 0, run.overwrite.stderr
    assert StoreReader(run.store).status == "complete"


def test_kill_right_after_the_store_is_created(crashes: dict[str, Future[Any]]) -> None:
    """Killed between creating zarr.json and writing its attributes: --overwrite can start over."""
    run: EarlyCrash = crashes["bare-zarr"].result()
    assert run.killed_rc == -signal.SIGKILL, run.killed_err
    assert "zarr.json" in run.digest
    line = one_error_line(run.resume.stderr)
    assert run.resume.returncode == 2
    assert str(run.store) in line
    assert run.digest_after_resume == run.digest
    assert run.overwrite.returncode == 0, run.overwrite.stderr
    assert StoreReader(run.store).status == "complete"
