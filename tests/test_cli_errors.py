"""Bad input and faults at the command line (SPEC sections 1 and 7).

Every case runs the real CLI in a subprocess and checks the exit code (2 bad input, 1 runtime
failure, 130 interrupted), exactly one `error: ...` line on stderr that names the problem, no
traceback, nothing on stdout, and that nothing committed is lost: bad input never creates a store,
an existing store or foreign directory is left byte for byte as it was. All subprocesses of this
module run up front, a few at a time (each is mostly interpreter and torch start-up).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
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
    wait_until,
)

from gentrace.store.reader import StoreReader

Make = Callable[[Path, Path], None]  # (path to create, a finished store to copy from)


def _plain_directory(path: Path, finished: Path) -> None:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work\n")


def _foreign_zarr(path: Path, finished: Path) -> None:
    root = zarr.open_group(path, mode="w")
    root.create_array("x", shape=(3,), dtype="int32")[...] = [1, 2, 3]


def _finished_store(path: Path, finished: Path) -> None:
    shutil.copytree(finished, path)


def _newer_store(path: Path, finished: Path) -> None:
    shutil.copytree(finished, path)
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["schema_version"] = 999
    (path / "zarr.json").write_text(json.dumps(doc))


@dataclass(frozen=True)
class BadInput:
    """`gentrace ARGS` must exit with `code`, its one error line containing every `names` entry.

    In args and names, `{cfg}` is a valid tiny config, `{tmp}` a scratch directory, `{out}` a store
    path that must still not exist afterwards, and `{target}` a path that `make` fills before the
    run and that must be byte for byte the same after it.
    """

    id: str
    args: tuple[str, ...]
    names: tuple[str, ...]
    code: int = 2
    make: Make | None = None


def _has_cuda() -> bool:
    return Path("/dev/nvidiactl").exists()


RECORD = ("record", "{cfg}", "--out", "{out}", "--quiet")
INTO_TARGET = ("record", "{cfg}", "--out", "{target}", "--quiet")
RESUME_TARGET = ("record", "--resume", "--out", "{target}", "--quiet")
NOT_OURS = ("{target}", "not a gentrace store")
CASES = [
    BadInput("bad-toml", ("record", "{tmp}/broken.toml", "--out", "{out}", "--quiet"), ("broken.toml", "TOML")),
    BadInput("unknown-key", ("record", "{tmp}/unknown.toml", "--out", "{out}", "--quiet"), ("train.foo",)),
    BadInput("wrong-type", (*RECORD, "--set", "train.epochs=1.5"), ("train.epochs", "integer")),
    BadInput("negative-lr", (*RECORD, "--set", "train.lr=-0.1"), ("train.lr", "-0.1")),
    BadInput(
        "n-train-too-large",
        (*RECORD, "--set", "data.name=digits", "--set", "data.n_train=2000"),
        ("data.n_train", "1797"),
    ),
    BadInput("freeze-matches-nothing", (*RECORD, "--set", 'model.freeze=["nothing"]'), ("model.freeze", "nothing")),
    BadInput("set-without-equals", (*RECORD, "--set", "train.lr"), ("--set", "train.lr", "KEY=VALUE")),
    BadInput(
        "mnist-files-missing",
        (*RECORD, "--set", "data.name=mnist", "--set", "data.root={tmp}/no-mnist"),
        ("{tmp}/no-mnist", "MNIST"),
    ),
    BadInput("cuda-without-gpu", (*RECORD, "--device", "cuda"), ("--device cuda", "GPU")),
    BadInput("resume-without-out", ("record", "--resume", "--quiet"), ("--resume", "--out")),
    BadInput("info-missing-store", ("info", "{tmp}/missing.zarr"), ("{tmp}/missing.zarr",)),
    BadInput("existing-store", INTO_TARGET, ("{target}", "--overwrite", "--resume"), make=_finished_store),
    BadInput("foreign-directory-overwrite", (*INTO_TARGET, "--overwrite"), NOT_OURS, make=_plain_directory),
    BadInput("foreign-zarr-overwrite", (*INTO_TARGET, "--overwrite"), NOT_OURS, make=_foreign_zarr),
    BadInput("foreign-directory-resume", RESUME_TARGET, NOT_OURS, make=_plain_directory),
    BadInput("newer-schema-info", ("info", "{target}"), ("{target}", "schema version 999"), make=_newer_store),
    BadInput("newer-schema-resume", RESUME_TARGET, ("{target}", "schema version 999"), make=_newer_store),
]


@dataclass
class Outcome:
    """A finished bad-input run, with the digest of its target taken before."""

    done: subprocess.CompletedProcess[str]
    fill: dict[str, Path]
    before: dict[str, bytes] | None


def run_bad_input(case: BadInput, tmp: Path, cfg: Path, finished: Path) -> Outcome:
    fill = {"cfg": cfg, "tmp": tmp, "out": tmp / f"{case.id}.zarr", "target": tmp / f"{case.id}-target"}
    before = None
    if case.make is not None:
        case.make(fill["target"], finished)
        before = tree_digest(fill["target"])
    done = run_cli(*(a.format(**fill) for a in case.args), cwd=tmp)
    return Outcome(done, fill, before)


@dataclass
class Interrupted:
    """A run stopped by SIGINT: its exit, a copy of the store as interrupted, then the resume."""

    proc: subprocess.Popen[str]
    out: str
    err: str
    interrupted: Path
    store: Path
    resume: subprocess.CompletedProcess[str]


def interrupt_and_resume(tmp: Path) -> Interrupted:
    store = tmp / "interrupted.zarr"
    # The run waits after step 7 (params row 1 committed) until it is interrupted: an event, not a guessed time.
    cfg, marker = tiny_config(tmp), tmp / "waiting"
    proc = start_cli("sigint-wait:7", marker, "record", cfg, "--out", store, "--quiet", driver="record_hooked.py")
    wait_until(marker.exists, proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    interrupted = tmp / "as-interrupted.zarr"
    shutil.copytree(store, interrupted)
    resume = run_cli("record", "--resume", "--out", store, "--quiet")
    return Interrupted(proc, out, err, interrupted, store, resume)


@dataclass
class Contended:
    """A second writer's attempts on a store whose first writer is alive and holds the lock."""

    store: Path
    attempts: dict[str, subprocess.CompletedProcess[str]]
    attrs_before: dict[str, Any]
    attrs_after: dict[str, Any]
    holder_alive: bool


def contend(tmp: Path) -> Contended:
    store, marker, cfg = tmp / "busy.zarr", tmp / "holding", tiny_config(tmp)
    holder = start_cli("hold:1", marker, "record", cfg, "--out", store, "--quiet", driver="record_hooked.py")
    try:
        wait_until(marker.exists, holder)
        before = store_attrs(store)
        attempts = concurrently(
            {
                "resume": lambda: run_cli("record", "--resume", "--out", store, "--quiet"),
                "overwrite": lambda: run_cli("record", cfg, "--overwrite", "--out", store, "--quiet"),
            },
            workers=2,
        )
        alive = holder.poll() is None
        return Contended(store, {k: f.result() for k, f in attempts.items()}, before, store_attrs(store), alive)
    finally:
        holder.kill()
        holder.communicate()


def diverge(tmp: Path) -> tuple[subprocess.CompletedProcess[str], Path, subprocess.CompletedProcess[str]]:
    store = tmp / "diverged.zarr"
    done = run_cli("record", tiny_config(tmp), "--set", "train.lr=1e30", "--out", store, "--quiet")
    return done, store, run_cli("info", store)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, reference_store: Path) -> dict[str, Future[Any]]:
    """Every subprocess of this module, run a few at a time; each test reads its own job's result."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    cfg = tiny_config(tmp)
    (tmp / "broken.toml").write_text("[train\nlr = 0.1\n")
    tiny_config(tmp, "unknown.toml", train={"foo": 1})
    (tmp / "no-mnist").mkdir()
    jobs: dict[str, Callable[[], Any]] = {}
    for name, job in (("second-writer", contend), ("sigint", interrupt_and_resume), ("nan-loss", diverge)):
        (tmp / name).mkdir()
        jobs[name] = partial(job, tmp / name)
    for case in CASES:
        if not (case.id == "cuda-without-gpu" and _has_cuda()):
            jobs[case.id] = partial(run_bad_input, case, tmp, cfg, reference_store)
    return concurrently(jobs)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_loses_nothing(case: BadInput, outcomes: dict[str, Future[Any]]) -> None:
    if case.id == "cuda-without-gpu" and _has_cuda():
        pytest.skip("this machine has a GPU")
    outcome: Outcome = outcomes[case.id].result()
    line = one_error_line(outcome.done.stderr)
    assert outcome.done.returncode == case.code, outcome.done.stderr
    assert outcome.done.stdout == ""
    for name in case.names:
        assert name.format(**outcome.fill) in line
    assert not outcome.fill["out"].exists(), "bad input left a store behind"
    if outcome.before is not None:
        assert tree_digest(outcome.fill["target"]) == outcome.before, "the existing directory was modified"


def test_nan_loss_stops_with_a_diverged_store(outcomes: dict[str, Future[Any]]) -> None:
    done, store, info = outcomes["nan-loss"].result()
    line = one_error_line(done.stderr)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "loss" in line
    assert "train.lr" in line
    reader = StoreReader(store)
    assert reader.status == "diverged"
    assert reader.committed("params") >= 1  # the initialization at least
    assert_committed_rows_filled(store)
    for name in reader.tensor_names("params"):
        assert np.isfinite(reader.array(f"params/{name}")).all()
    assert info.returncode == 0, info.stderr
    assert "diverged" in info.stdout


def test_sigint_flushes_marks_interrupted_and_resumes(outcomes: dict[str, Future[Any]], reference_store: Path) -> None:
    run: Interrupted = outcomes["sigint"].result()
    line = one_error_line(run.err)
    assert run.proc.returncode == 130, run.err
    assert run.out == ""
    assert "interrupted" in line
    assert str(run.store) in line
    reader, reference = StoreReader(run.interrupted), StoreReader(reference_store)
    assert store_attrs(run.interrupted)["status"] == "interrupted"
    assert reader.status == "interrupted"
    assert 1 <= reader.committed("params") < reference.committed("params")
    assert_committed_rows_filled(run.interrupted)

    assert run.resume.returncode == 0, run.resume.stderr
    assert run.resume.stdout.strip() == str(run.store)
    final = StoreReader(run.store)
    assert final.status == "complete"
    for paths in reference.streams().values():
        for path in paths:
            assert np.array_equal(final.array(path), reference.array(path)), path


def test_second_writer_is_refused(outcomes: dict[str, Future[Any]]) -> None:
    run: Contended = outcomes["second-writer"].result()
    for done in run.attempts.values():
        line = one_error_line(done.stderr)
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert str(run.store) in line
        assert "another gentrace process" in line
    assert run.holder_alive, "the first writer died while the second one tried"
    assert run.attrs_after == run.attrs_before
    assert StoreReader(run.store).committed("params") >= 2  # rows 0 and 1, perhaps 2 written in the same batch
    assert_committed_rows_filled(run.store)
