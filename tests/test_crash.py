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
    run_cli,
    start_cli,
    store_attrs,
    tiny_config,
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
    verify: subprocess.CompletedProcess[str]


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


def kill_resume_at(moment: str, store: Path, timeout: float = 120) -> tuple[int, str]:
    """`record --resume` the store and SIGKILL that resume at `moment` (a kill of the resume itself)."""
    proc = start_cli(
        moment,
        store.with_suffix(".marker2"),
        "record",
        "--resume",
        "--out",
        store,
        "--quiet",
        driver="record_hooked.py",
    )
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def crash(moment: str, cfg: Path, store: Path) -> Crash:
    """Kill at `moment` ("first+then": kill at `first`, then kill the resume at `then`), copy, info, verify, resume."""
    first, _, then = moment.partition("+")
    rc, err = kill_at(first, cfg, store)
    if then:
        rc, err = kill_resume_at(then, store)
    killed = store.with_name(f"{store.stem}-as-killed.zarr")
    shutil.copytree(store, killed)
    info = run_cli("info", store)
    verify = run_cli("verify", killed, "--quiet")
    return Crash(rc, err, killed, store, info, run_cli("record", "--resume", "--out", store, "--quiet"), verify)


# Kills before anything was committed: `--resume` starts such a store over from step 0.
EARLY = {"first-write": "first-write", "bare-zarr": "bare-zarr"}
# Kills of a resume while it cuts the store back to its checkpoint, and of the final close.
LATE = {"resume-killed-while-truncating": "step:17+truncating", "finish-killed-before-status-complete": "final-status"}
# With the default `checkpoint_every_s` (30 s) only the last snapshot of TINY carries a checkpoint, none at
# step 0: a kill after rows were committed leaves no checkpoint, and `--resume` starts over.
UNCHECKPOINTED = {"step-7-rows-committed-no-checkpoint-yet": "step:7"}


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory, reference_store: Path) -> dict[str, Future[Any]]:
    """Every moment killed, copied, `info`-ed and resumed; every early kill too (a few at a time)."""
    tmp = tmp_path_factory.mktemp("crash")
    cfg = tiny_config(tmp)
    every_30_s = tiny_config(tmp, "tiny-30s.toml", **{"record.checkpoint_every_s": 30})
    jobs: dict[str, Callable[[], Any]] = {}
    for name, moment in {**MOMENTS, **EARLY, **LATE}.items():
        jobs[name] = partial(crash, moment, cfg, tmp / f"{name}.zarr")
    for name, moment in UNCHECKPOINTED.items():
        jobs[name] = partial(crash, moment, every_30_s, tmp / f"{name}.zarr")
    return concurrently(jobs)


@pytest.fixture(params=list({**MOMENTS, **EARLY, **LATE, **UNCHECKPOINTED}))
def crashed(request: pytest.FixtureRequest, crashes: dict[str, Future[Any]]) -> Crash:
    """The run killed at one moment."""
    result: Crash = crashes[request.param].result()
    assert result.killed_rc == -signal.SIGKILL, f"the run ended before the moment to kill it:\n{result.killed_err}"
    return result


def test_killed_store_opens_with_plain_zarr(crashed: Crash) -> None:
    root = zarr.open_group(crashed.killed, mode="r")
    assert root.attrs["status"] in ("running", "initializing")
    assert crashed.killed_rc == -signal.SIGKILL, crashed.killed_err


def test_info_lists_every_stream_of_a_killed_store(crashed: Crash) -> None:
    assert crashed.info.returncode == 0, crashed.info.stderr
    assert re.search(r"^status\s+killed", crashed.info.stdout, re.MULTILINE)
    streams = store_attrs(crashed.killed).get("streams", {})
    if streams:  # a store killed while being created may not list its streams yet
        assert set(streams) == {"metrics", "metrics_fine", "params", "params_fine", "preds", "grad", "acts"}
    for stream in streams:
        assert re.search(rf"^{stream}\s+\d+", crashed.info.stdout, re.MULTILINE), stream


def test_killed_store_verifies_and_its_committed_rows_hold_no_fill_values(crashed: Crash) -> None:
    assert crashed.verify.returncode == 0, crashed.verify.stdout + crashed.verify.stderr
    assert crashed.verify.stderr == ""
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


def test_kill_before_the_first_snapshot_is_started_over(crashes: dict[str, Future[Any]]) -> None:
    """Nothing committed: `--resume` (and so `sweep`) records the run from step 0 (see the resume test)."""
    for name in EARLY:
        run: Crash = crashes[name].result()
        assert store_attrs(run.killed)["committed"].get("params", 0) == 0, name
        assert run.resume.returncode == 0, run.resume.stderr
        assert StoreReader(run.store).status == "complete"


def test_a_kill_before_the_first_checkpoint_starts_over_with_a_warning(crashes: dict[str, Future[Any]]) -> None:
    """Step 0 carries no checkpoint (its state is the config's): rows committed, none to resume from.

    The resume records the run again from step 0 with the stored thread count (the generic resume
    test checks it reaches the uninterrupted run exactly) and says so in one warning line.
    """
    run: Crash = crashes["step-7-rows-committed-no-checkpoint-yet"].result()
    attrs = store_attrs(run.killed)
    assert attrs["committed"]["params"] >= 1  # the driver waits for params row 0 on disk
    assert StoreReader(run.killed).checkpoint_steps() == []
    assert attrs.get("checkpoint_step") is None
    assert run.resume.returncode == 0, run.resume.stderr
    assert run.resume.stderr.splitlines() == [
        f"warning: {run.store} has no resume checkpoint yet; the run starts over from step 0"
    ]
    final = store_attrs(run.store)
    assert final["threads"] == attrs["threads"]
    assert StoreReader(run.store).checkpoint_steps() == [20]  # the last snapshot's


def test_a_resume_killed_while_truncating_left_the_cut_rows_uncommitted(crashes: dict[str, Future[Any]]) -> None:
    """The counters are lowered before anything is deleted: what the kill left is the checkpoint's rows."""
    run: Crash = crashes["resume-killed-while-truncating"].result()
    attrs = store_attrs(run.killed)
    steps = StoreReader(run.killed).array("params/step")
    assert steps.tolist() == sorted(steps.tolist())
    assert (steps >= 0).all()
    assert int(steps[-1]) == attrs["checkpoint_step"]
