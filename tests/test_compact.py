"""`gentrace compact`: fewer files, identical arrays and analyses, crash-safe, and a compacted run is history."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import one_error_line, one_row_per_chunk, run_cli, tiny_config

from gentrace.analyses import gsnr, lipschitz, mi, osgr, paths, trajectory
from gentrace.core import config
from gentrace.core.errors import StoreError
from gentrace.store import compact as compact_mod
from gentrace.store.reader import StoreReader
from gentrace.store.writer import open_for_resume
from gentrace.training import run

# Every stream an analysis reads, two replicates and per-step evaluation (osgr).
STREAMS = {
    "train": {"replicates": 2, "epochs": 3},
    "record.eval_every_steps": 1,
    "record.params": {"every_epochs": 1, "names": "all"},
    "record.params_fine": {"every_steps": 1, "names": ["first_layer.bias"]},
    "record.predictions": {"every_epochs": 1, "splits": ["train", "test"]},
    "record.grad_moments": {"every_steps": 0, "every_epochs": 1, "source": "probe", "samples": 0},
    "record.activations": {"every_epochs": 1, "probe": 40, "layers": "relu", "values": False},
}

ANALYSES: dict[str, Callable[[StoreReader], pd.DataFrame]] = {
    "gsnr-layer": lambda r: gsnr.run(r, by="layer"),
    "osgr": osgr.run,
    "paths-self": lambda r: paths.run(r, kind="self"),
    "paths-overlap": lambda r: paths.run(r, kind="overlap", pairs=True),
    "mi": lambda r: mi.run(r, reference="null", cache=False),
    "trajectory": trajectory.run,
    "lipschitz": lambda r: lipschitz.run(r, where="train"),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run with every stream, one row per chunk (recorded once; each test compacts its own copy).

    One row per chunk: the layout of stores written before chunks held several rows, and of rows of 1 MiB
    or more; a tiny run's packed arrays are one chunk each, which compaction rightly leaves alone.
    """
    tmp = tmp_path_factory.mktemp("compact")
    cfg = config.load(tiny_config(tmp, **STREAMS), [])
    with one_row_per_chunk():
        return run.record(cfg, tmp / "run.zarr", device="cpu")


def _copy(store: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(store, target)
    return target


def _all_arrays(store: Path) -> dict[str, np.ndarray]:
    reader = StoreReader(store)
    return {path: reader.array(path) for path in reader.array_paths()}


def test_compact_cuts_files_and_keeps_every_array_and_analysis(finished: Path, tmp_path: Path) -> None:
    store = _copy(finished, tmp_path)
    before = {name: fn(StoreReader(store)) for name, fn in ANALYSES.items()}
    arrays = _all_arrays(store)

    report = compact_mod.compact(store)

    assert report.arrays > 10
    assert report.files_after < report.files_before, (report.files_before, report.files_after)
    reader = StoreReader(store)
    for path in ("params/0.weight", "grad/0.weight/sumsq", "preds/test"):
        assert reader.lazy(path).shards is not None
        chunk_files = [f for f in (store / path).iterdir() if f.name != "zarr.json"]
        assert len(chunk_files) == 1, (path, chunk_files)  # every row in one shard
    after = _all_arrays(store)
    assert after.keys() == arrays.keys()
    for path, values in arrays.items():
        np.testing.assert_array_equal(after[path], values, err_msg=path)
    for name, fn in ANALYSES.items():
        pd.testing.assert_frame_equal(fn(reader), before[name], check_exact=True, obj=name)
    # Plain zarr reads it too, with no stray files or groups left behind.
    zarr.open_group(str(store), mode="r").members(max_depth=None)
    assert not compact_mod.staging_dir(store).exists()
    # A second compaction has nothing left to merge.
    assert compact_mod.compact(store).arrays == 0


def test_a_killed_compaction_is_finished_by_the_next(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _copy(finished, tmp_path)
    arrays = _all_arrays(store)
    real_rename = Path.rename
    staged = compact_mod.staging_dir(store) / "new"
    moved: list[Path] = []

    def dies_between_the_two_renames(self: Path, target: Path) -> Path:
        # Step 3 (staging/new -> store) of the fourth array: that array is out of the store now.
        if self.is_relative_to(staged):
            if len(moved) == 3:
                raise KeyboardInterrupt
            moved.append(self)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", dies_between_the_two_renames)
    with pytest.raises(KeyboardInterrupt):
        compact_mod.compact(store)
    monkeypatch.setattr(Path, "rename", real_rename)
    missing = [p for p in arrays if not (store / p / "zarr.json").exists()]
    assert len(missing) == 1  # the kill left exactly one array out of the store
    # Until a compaction finishes, readers and --resume refuse the half-sharded store.
    with pytest.raises(StoreError, match="being compacted"):
        StoreReader(store)
    with pytest.raises(StoreError, match="compacted"):
        open_for_resume(store)

    compact_mod.compact(store)
    after = _all_arrays(store)
    for path, values in arrays.items():
        np.testing.assert_array_equal(after[path], values, err_msg=path)
    assert not compact_mod.staging_dir(store).exists()


@pytest.mark.parametrize("status", ["interrupted", "failed"])
def test_resumable_runs_need_final_and_compacted_runs_cannot_resume(
    finished: Path, tmp_path: Path, status: str
) -> None:
    store = _copy(finished, tmp_path)
    root = zarr.open_group(str(store), mode="r+")
    root.attrs.update({"status": status})
    with pytest.raises(StoreError, match="--final"):
        compact_mod.compact(store)

    done = run_cli("compact", store, "--final")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(store)
    assert "files" in done.stderr
    info = run_cli("info", store)
    assert "(compacted into shards)" in info.stdout, info.stdout

    resumed = run_cli("record", "--resume", "--out", store, "--quiet")
    assert resumed.returncode == 2
    assert "compacted" in one_error_line(resumed.stderr)


def test_compact_of_a_directory_that_is_not_a_store_is_one_line(tmp_path: Path) -> None:
    done = run_cli("compact", tmp_path)
    assert done.returncode == 2
    assert "not a gentrace store" in one_error_line(done.stderr)


def test_compact_from_inside_the_store(finished: Path, tmp_path: Path) -> None:
    store = _copy(finished, tmp_path)
    done = run_cli("compact", ".", "--quiet", cwd=store)
    assert done.returncode == 0, done.stderr
    assert StoreReader(store).attrs["compacted"]["arrays"] > 10
    assert not (tmp_path / "copy.zarr.compacting").exists()


@pytest.mark.parametrize("size", ["nan", "inf", "0", "-1"])
def test_a_bad_shard_size_is_one_line(finished: Path, size: str) -> None:
    done = run_cli("compact", finished, "--shard-mb", size)
    assert done.returncode == 2
    assert "--shard-mb" in one_error_line(done.stderr)
