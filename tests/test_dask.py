"""`--dask`: gsnr, paths and mi on a dask.distributed cluster give the in-process table exactly.

The workers run the same chunk tasks (gentrace.analyses.plan) as `plan.local`, and every chunk's
numbers come from the same code on the same rows, so the tables are compared with
`check_exact=True`: equal to the last bit, not to a tolerance. The split into chunks differs (paths
and mi are cut into `parts` blocks on the cluster, one per layer or replicate in-process), which
also checks that the blocks join without a seam.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import zarr
from conftest import one_error_line, run_cli
from synthetic_store import Size, write_store
from typer.testing import CliRunner

from gentrace.analyses import dask_backend, gsnr, mi, paths
from gentrace.analyses import plan as chunks
from gentrace.cli.app import app
from gentrace.core.errors import ConfigError
from gentrace.store.reader import StoreReader
from gentrace.training.sweep import over_stores

distributed = pytest.importorskip("dask.distributed")

SIZE = Size(rows=7, params=8192, replicates=2, probes=40, units=2000, n_test=3000, n_train=700, classes=4)
PARTS = 3  # blocks per layer (paths) or replicate (mi) on the cluster


@dataclass(frozen=True)
class Case:
    id: str
    plan: Callable[[StoreReader, int], chunks.Plan]


CASES = [
    *(Case(f"gsnr-{by}", lambda r, _, by=by: gsnr.plan(r, by)) for by in gsnr.BY),
    Case("gsnr-replicate-1", lambda r, _: gsnr.plan(r, "layer", 1)),
    *(
        Case(f"paths-{kind}", lambda r, n, kind=kind: paths.plan(r, kind=kind, device="cpu", parts=n))
        for kind in ("overlap", "cross", "self", "rank")
    ),
    Case("paths-cross-pairs", lambda r, n: paths.plan(r, kind="cross", pairs=True, device="cpu", parts=n)),
    Case("mi-linear", lambda r, n: mi.plan(r, parts=n)),
    Case("mi-null-summary", lambda r, n: mi.plan(r, "null", summary=True, parts=n)),
    Case("mi-train", lambda r, n: mi.plan(r, split="train", parts=n)),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("dask") / "run.zarr", SIZE)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cluster_equals_in_process(store: Path, client: Any, case: Case) -> None:
    reader = StoreReader(store)
    here = pd.concat(list(chunks.local(case.plan(reader, 1))), ignore_index=True)
    there = pd.concat(list(dask_backend.frames(case.plan(reader, PARTS), client)), ignore_index=True)
    assert len(here) > 0
    pd.testing.assert_frame_equal(there, here, check_exact=True)


def test_tasks_ran_on_the_workers(store: Path, client: Any) -> None:
    before = sum(len(log) for log in client.run(lambda dask_worker: list(dask_worker.state.log)).values())
    list(dask_backend.frames(gsnr.plan(StoreReader(store)), client))
    after = sum(len(log) for log in client.run(lambda dask_worker: list(dask_worker.state.log)).values())
    assert after > before


def test_worker_errors_keep_their_type(store: Path, client: Any) -> None:
    plan = mi.plan(StoreReader(store), parts=2)
    broken = chunks.Plan([chunks.Task(mi._block_task, ("/no/such/store", *plan.tasks[0].args[1:]))])
    with pytest.raises(Exception, match="does not exist"):
        list(dask_backend.frames(broken, client))


@pytest.mark.slow
def test_cli_dask_local_prints_the_same_csv(store: Path) -> None:
    command = ["analyze", "paths", str(store), "--kind", "cross", "--device", "cpu"]  # blocks of epochs per layer
    here = run_cli(*command)
    there = run_cli(*command, "--dask", "local", timeout=300)  # a LocalCluster of worker processes
    assert here.returncode == 0, here.stderr
    assert there.returncode == 0, there.stderr
    assert there.stdout == here.stdout


def test_unreachable_scheduler_is_one_line_exit_2(store: Path) -> None:
    done = run_cli("analyze", "gsnr", store, "--dask", "tcp://127.0.0.1:9")
    assert done.returncode == 2
    assert "no dask scheduler answers" in one_error_line(done.stderr)


def test_without_distributed_is_one_line_exit_2(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails as if not installed
    result = CliRunner().invoke(app, ["analyze", "mi", str(store), "--dask", "local"])
    assert result.exit_code == 2
    assert "pip install 'gentrace[dask]'" in result.output


def test_scattered_reference_gives_the_same_table(store: Path, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dask_backend, "SCATTER_BYTES", 1)  # every array argument goes to the workers once
    reader = StoreReader(store)
    here = pd.concat(list(chunks.local(mi.plan(reader))), ignore_index=True)
    there = pd.concat(list(dask_backend.frames(mi.plan(reader, parts=PARTS), client)), ignore_index=True)
    pd.testing.assert_frame_equal(there, here, check_exact=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_plans_send_the_absolute_store_path(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    monkeypatch.chdir(store.parent)
    plan = case.plan(StoreReader(Path(store.name)), PARTS)  # a relative path, as typed on the command line
    assert {task.args[0] for task in plan.tasks} == {str(store.resolve())}
    monkeypatch.chdir(tmp_path)  # a worker started in another directory still finds the store
    assert len(pd.concat(list(chunks.local(plan)), ignore_index=True)) > 0


def test_store_column_keeps_the_paths_as_given(
    store: Path, tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(store, tmp_path / "b.zarr")
    shutil.copytree(store, tmp_path / "a.zarr")
    monkeypatch.chdir(tmp_path)
    given = [Path("a.zarr"), Path("b.zarr")]
    table = pd.concat(list(over_stores(given, lambda r: dask_backend.frames(gsnr.plan(r), client))), ignore_index=True)
    assert list(table["store"].unique()) == ["a.zarr", "b.zarr"]


def test_scheduler_without_workers_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dask_backend, "WORKERS_TIMEOUT_S", 0.5)
    with distributed.LocalCluster(
        n_workers=0,
        processes=False,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": dask_backend.FREE_PORT},
    ) as cluster:
        start = time.monotonic()
        with (
            pytest.raises(ConfigError, match="no dask worker joined the scheduler") as caught,
            dask_backend.connect(cluster.scheduler_address),
        ):
            pass
        assert time.monotonic() - start < 10
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"dask worker {cluster.scheduler_address}" in message
    assert caught.value.exit_code == 2


@pytest.mark.slow
def test_worker_input_error_is_one_line_exit_2(store: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(store, tmp_path / "broken.zarr")
    zarr.open_array(broken / "grad" / "n", mode="r+")[2, 1] = 0  # gsnr refuses n = 0 inside a task
    done = run_cli("analyze", "gsnr", broken, "--dask", "local", timeout=300)
    assert done.returncode == 2, done.stderr
    assert "has n = 0 samples at step 2" in one_error_line(done.stderr)


def test_tls_scheduler_without_certificates_is_one_line_exit_2(store: Path) -> None:
    done = run_cli("analyze", "gsnr", store, "--dask", "tls://127.0.0.1:9")
    assert done.returncode == 2
    assert "no dask scheduler answers" in one_error_line(done.stderr)
