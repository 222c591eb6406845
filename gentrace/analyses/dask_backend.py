"""Run an analysis plan on a dask.distributed cluster: `gentrace analyze gsnr|paths|mi --dask SCHEDULER`.

SPEC section 6. The tasks of a `gentrace.analyses.plan.Plan` (one chunk each: a store path, row
numbers and options) are submitted to the cluster; every worker opens the store read-only itself and
returns the frames of its chunk; here the frames are gathered in task order and passed through the
plan's `finish`. The workers run exactly the code `plan.local` runs, so the table is the same as
in-process, row for row.

    --dask local               a LocalCluster on this machine (one worker process per core)
    --dask tcp://host:8786     an existing scheduler; its workers must see the store at the same path
                               (a shared file system) and have gentrace installed

A GentraceError raised in a task (a damaged store, say) comes back as the task's value and is raised
here with its type, and the local cluster's logs are silenced: the CLI prints its one `error:` line
on stderr, not the workers' logs and tracebacks. Plans send the store's absolute path, so workers
started in another directory open the same store.

At most WINDOW tasks per worker thread are in flight: finished chunks wait on the workers only until
they are gathered, so memory stays bounded on both sides whatever the number of chunks.
dask.distributed is an optional dependency (`pip install 'gentrace[dask]'`), imported only here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gentrace.analyses.plan import Plan, Task
from gentrace.core.errors import ConfigError, GentraceError

LOCAL = "local"
CONNECT_TIMEOUT_S = 10
WORKERS_TIMEOUT_S = 30  # how long to wait for the first worker to join the scheduler
WINDOW = 4  # tasks in flight per worker thread
SCATTER_BYTES = 2**16
FREE_PORT = "127.0.0.1:0"  # the local scheduler's HTTP server (no dashboard): any free port


@contextmanager
def connect(address: str) -> Iterator[Any]:
    """A dask.distributed Client for `address` ('local': a new LocalCluster), closed on exit.

    Raises:
        ConfigError: dask.distributed is not installed, no scheduler answers at `address`, or no
            worker joins it within WORKERS_TIMEOUT_S.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError(
            "--dask needs dask.distributed, which is not installed; pip install 'gentrace[dask]'"
        ) from None
    if address == LOCAL:
        with (
            LocalCluster(
                dashboard_address=None,
                scheduler_kwargs={"dashboard_address": FREE_PORT},  # no warning when 8787 is taken
                silence_logs=logging.CRITICAL,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, TypeError, ValueError) as exc:  # TypeError: tls:// without an ssl_context
        raise ConfigError(
            f"--dask {address}: no dask scheduler answers there ({_reason(exc)}); start one with `dask scheduler` "
            "(and workers with `dask worker ADDRESS`), or use --dask local"
        ) from None
    try:
        _wait_for_a_worker(client, address)
        yield client
    finally:
        client.close()


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name."""
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _wait_for_a_worker(client: Any, address: str) -> None:
    """Return once a worker has joined the scheduler: with none, tasks would wait forever."""
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:  # WorkerStartTimeoutError is a TimeoutError
        raise ConfigError(
            f"--dask {address}: no dask worker joined the scheduler within {WORKERS_TIMEOUT_S} s ({_reason(exc)}); "
            f"start one with `dask worker {address}`"
        ) from None


def threads(client: Any) -> int:
    """Worker threads of the cluster (at least 1)."""
    return max(1, sum(client.nthreads().values()))


def parts(client: Any) -> int:
    """How many blocks to split a stream into so that every worker thread has work: 2 per thread."""
    return 2 * threads(client)


@dataclass(frozen=True)
class _Failed:
    """A task's GentraceError, sent back as its value: no worker log or traceback, re-raised here."""

    error: GentraceError


def _materialize(fn: Any, *args: Any) -> list[pd.DataFrame] | _Failed:
    """Run one task on a worker (its scattered arguments already resolved); its frames travel back as a list."""
    try:
        return list(Task(fn, args)())
    except GentraceError as exc:
        return _Failed(exc)


def _submit(client: Any, task: Task, scattered: dict[int, Any]) -> Any:
    """Submit a task; a large array argument (mi's reference predictions) is sent to the workers once, not per task."""
    args = []
    for arg in task.args:
        if isinstance(arg, np.ndarray) and arg.nbytes >= SCATTER_BYTES:
            if id(arg) not in scattered:
                scattered[id(arg)] = (arg, client.scatter(arg, broadcast=True))  # keeps arg alive: ids stay unique
            args.append(scattered[id(arg)][1])
        else:
            args.append(arg)
    return client.submit(_materialize, task.fn, *args, pure=False)


def frames(plan: Plan, client: Any) -> Iterator[pd.DataFrame]:
    """The plan's output frames, its tasks run on the cluster behind `client`, in task order."""
    yield from plan.output(_gathered(plan, client))


def _gathered(plan: Plan, client: Any) -> Iterator[pd.DataFrame]:
    window = WINDOW * threads(client)
    pending = iter(plan.tasks)
    in_flight: deque[Any] = deque()
    scattered: dict[int, Any] = {}
    for task in pending:
        in_flight.append(_submit(client, task, scattered))
        if len(in_flight) >= window:
            break
    while in_flight:
        future = in_flight.popleft()
        result = future.result()
        future.release()
        if isinstance(result, _Failed):
            raise result.error  # a worker's GentraceError, with its type
        nxt = next(pending, None)
        if nxt is not None:
            in_flight.append(_submit(client, nxt, scattered))
        yield from result
