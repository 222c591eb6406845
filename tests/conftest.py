"""Shared test helpers: tiny run configs, the CLI in a subprocess, store attrs, an uninterrupted reference run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest
import zarr

# `train.threads = auto` sizes torch's threads by the machine's load at the start of each run, and the
# thread count changes float rounding. Tests that compare two runs in one process need one count, so
# the suite fixes it the way a user would (auto respects OMP_NUM_THREADS); test_threads.py tests auto.
os.environ.setdefault("OMP_NUM_THREADS", "2")

if TYPE_CHECKING:
    from gentrace.record.base import StepInfo

DRIVERS = Path(__file__).parent / "drivers"

# A classification run that records every stream in a few seconds, most of them imports: 100 samples
# x 4 epochs of 5 steps, params snapshots (each with a resume checkpoint) at steps 0, 5, .., 20.
# The synthetic sinusoid set rather than digits: reading digits imports scikit-learn, which costs
# about 1 s of CPU in every subprocess.
TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"name": "sinusoid", "dim": 10, "n_train": 100, "n_test": 100, "seed": 0},
    "model": {"arch": "mlp", "hidden": [16], "seed": 0},
    "train": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "batch_size": 20, "epochs": 4},
    "record": {"checkpoint_every_s": 0},
}

# One intra-op thread in every subprocess: results do not depend on how many tests run at once,
# so a resumed run can be compared bit for bit with an uninterrupted one.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

T = TypeVar("T")


def tiny_config(tmp_path: Path, filename: str = "tiny.toml", **overrides: Any) -> Path:
    """Write TINY, updated by `overrides`, as TOML into `tmp_path / filename`; returns the file.

    An override is a table merged into its section (`train={"epochs": 2}`), a top-level value
    (`name="x"`), or a dotted key passed with `**{"record.params.every_epochs": 2}`.
    """
    raw = json.loads(json.dumps(TINY))  # a deep copy
    for key, value in overrides.items():
        *tables, leaf = key.split(".")
        node = raw
        for table in tables:
            node = node.setdefault(table, {})
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    path = tmp_path / filename
    path.write_text(to_toml(raw))
    return path


def to_toml(raw: Mapping[str, Any]) -> str:
    """Plain data -> TOML: top-level values, then one table per dict (nested dicts inline)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, Mapping)]
    for section, table in raw.items():
        if isinstance(table, Mapping):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def gentrace_cmd(*args: str | Path) -> list[str]:
    """`python -m gentrace ARGS` with this interpreter."""
    return [sys.executable, "-m", "gentrace", *map(str, args)]


def run_cli(*args: str | Path, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `gentrace ARGS` to the end in a subprocess; stdout and stderr captured as text."""
    return subprocess.run(
        gentrace_cmd(*args), env=ENV, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def start_cli(*args: str | Path, driver: str | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start `gentrace ARGS` (or `python tests/drivers/<driver> ARGS`) without waiting for it."""
    cmd = gentrace_cmd(*args) if driver is None else [sys.executable, str(DRIVERS / driver), *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def concurrently(jobs: Mapping[str, Callable[[], T]], workers: int = 3) -> dict[str, Future[T]]:
    """Run independent jobs (each mostly waiting on subprocesses) a few at a time, until all are done.

    Returns each job's finished future: `.result()` gives its value or raises its error, so a
    failing job fails only the tests that look at it.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {name: pool.submit(job) for name, job in jobs.items()}


def store_attrs(store: Path) -> dict[str, Any]:
    """Root attributes of a store, read straight from its zarr.json (no gentrace code involved)."""
    return dict(json.loads((Path(store) / "zarr.json").read_text()).get("attributes", {}))


def committed_rows(store: Path, stream: str) -> int:
    """Rows of `stream` the store says are committed (0 while the store or the counter is missing)."""
    try:
        return int(store_attrs(store).get("committed", {}).get(stream, 0))
    except (OSError, ValueError):
        return 0


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[str] | None = None, timeout: float = 60) -> None:
    """Poll `condition` every 10 ms; fail if `proc` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (exit {proc.returncode}) before the awaited moment:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for the awaited moment")
        time.sleep(0.01)


def one_error_line(stderr: str) -> str:
    """Assert stderr is exactly one `error: ...` line without a traceback; return it."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error: "), stderr
    assert lines[0][len("error: ") :].strip(), stderr
    return lines[0]


def assert_committed_rows_filled(store: Path) -> None:
    """Every stream array, read with plain zarr up to `committed`, holds no fill value (NaN / -1).

    Accuracies of a regression run are NaN by definition; call this on classification runs.
    """
    attrs = store_attrs(store)
    root = zarr.open_group(store, mode="r")
    for stream, paths in attrs.get("streams", {}).items():
        rows = int(attrs["committed"].get(stream, 0))
        for path in paths:
            array = root[path]
            assert isinstance(array, zarr.Array)
            assert array.shape[0] >= rows, f"{path}: {array.shape[0]} rows on disk, {rows} committed"
            values = np.asarray(array[:rows])
            if values.dtype.kind == "f":
                assert not np.isnan(values).any(), f"{path}: NaN fill in the first {rows} committed rows"
            else:
                assert not (values == -1).any(), f"{path}: -1 fill in the first {rows} committed rows"
        steps = np.asarray(root[f"{stream}/step"][:rows])
        assert (np.diff(steps) > 0).all(), f"{stream}/step is not increasing: {steps}"


class StopAt:
    """A step observer that raises KeyboardInterrupt (what SIGINT does) after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, info: StepInfo) -> None:
        if info.step == self.step:
            raise KeyboardInterrupt


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file under `path` and its bytes: equal digests mean the directory was left untouched."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob("*")) if f.is_file()}


@contextlib.contextmanager
def one_row_per_chunk() -> Iterator[None]:
    """Record with one row per chunk, the layout of stores written before issue 16 and of huge rows:
    the many-chunk arrays `gentrace compact` turns into shards."""
    from gentrace.store import schema

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(schema, "PACKED_CHUNK_BYTES", 1)
        yield


@pytest.fixture(scope="session")
def one_row_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TINY config recorded with one row per chunk (see `one_row_per_chunk`), for compaction tests."""
    from gentrace.core import config
    from gentrace.training import run

    tmp = tmp_path_factory.mktemp("one-row")
    with one_row_per_chunk():
        return run.record(config.load(tiny_config(tmp), []), tmp / "one-row.zarr", device="cpu")


@pytest.fixture(scope="session")
def reference_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TINY config recorded once, uninterrupted: what every killed-and-resumed run must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    store = tmp / "reference.zarr"
    done = run_cli("record", tiny_config(tmp), "--out", store, "--quiet")
    assert done.returncode == 0, done.stderr
    return store
