"""analyze trajectory: a NumPy loop over the stored params_fine / metrics_fine, closed forms, several stores."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from gentrace.analyses import trajectory
from gentrace.cli.app import app
from gentrace.core import config
from gentrace.store.reader import StoreReader
from gentrace.training import run

# cos2d regression (err = |f(x) - y|), SGD without momentum, 2 replicates, 3 epochs of 5 steps.
TINY = [
    'data.name="cos2d"', "data.n_train=20", "data.n_test=20", "model.hidden=[8]", "train.batch_size=4",
    "train.epochs=3", "train.replicates=2", "train.momentum=0.0", "train.lr=0.01", "record.checkpoint_every_s=0",
    "record.grad_moments.every_epochs=0", "record.activations.every_epochs=0", "record.predictions.every_epochs=0",
]  # fmt: skip


def record(path: Path, *extra: str) -> StoreReader:
    """Record the tiny cos2d run (with `extra` overrides) on the CPU."""
    return StoreReader(run.record(config.load(None, [*TINY, *extra]), path, device="cpu"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[StoreReader]:
    """Two tiny runs that differ only in data.freq, inside one directory."""
    root = tmp_path_factory.mktemp("traj")
    return [record(root / "f1.zarr", "data.freq=1.0"), record(root / "f2.zarr", "data.freq=2.0")]


def reference(reader: StoreReader, stream: str, name: str, last: int) -> dict[str, np.ndarray]:
    """Per replicate, by explicit loops over snapshots and updates (float64)."""
    steps = reader.array(f"{stream}/step")
    b = reader.array(f"{stream}/{name}").astype(np.float64)
    fstep = list(reader.array("metrics_fine/step"))
    lr, err = reader.array("metrics_fine/lr"), reader.array("metrics_fine/batch_error").astype(np.float64)
    out: dict[str, list[float]] = {"length": [], "normalized_length": [], "distance_from_init": [], "step_variance": []}
    for m in range(b.shape[1]):
        length = normalized = 0.0
        for k in range(1, len(steps)):
            move = np.sqrt(((b[k, m] - b[k - 1, m]) ** 2).sum())
            denom = sum(lr[fstep.index(u)] * err[fstep.index(u), m] for u in range(steps[k - 1] + 1, steps[k] + 1))
            length += move
            normalized += move / denom
        window = b[-last:, m].reshape(last, -1)
        out["length"].append(length)
        out["normalized_length"].append(normalized)
        out["distance_from_init"].append(np.sqrt(((b[-1, m] - b[0, m]) ** 2).sum()))
        out["step_variance"].append(((window - window.mean(axis=0)) ** 2).mean(axis=0).sum())
    return {key: np.array(value) for key, value in out.items()}


@pytest.mark.parametrize(
    ("param", "stream", "name", "last"),
    [
        pytest.param(None, "params_fine", "0.bias", 16, id="fine-default"),
        pytest.param("first_layer.bias", "params_fine", "0.bias", 4, id="fine-alias-last4"),
        pytest.param("2.weight", "params", "2.weight", 2, id="coarse-params"),
    ],
)
def test_equals_numpy_reference(
    stores: list[StoreReader], param: str | None, stream: str, name: str, last: int
) -> None:
    reader = stores[0]
    got = trajectory.run(reader, param=param, last=None if param is None else last)
    want = reference(reader, stream, name, last)
    assert list(got.columns) == trajectory.COLUMNS["replicate"]
    assert (got["source"] == stream).all()
    assert (got["param"] == name).all()
    for key, value in want.items():
        np.testing.assert_allclose(got[key].to_numpy(), value, rtol=1e-10, atol=1e-12, err_msg=key)


def test_by_epoch_and_step_add_up(stores: list[StoreReader]) -> None:
    reader = stores[0]
    total = trajectory.run(reader)
    per_epoch = trajectory.run(reader, by="epoch")
    per_step = trajectory.run(reader, by="step")
    assert list(per_epoch.columns) == trajectory.COLUMNS["epoch"]
    assert list(per_step.columns) == trajectory.COLUMNS["step"]
    assert sorted(per_epoch["epoch"].unique()) == [0, 1, 2]
    for col in ("length", "normalized_length"):
        summed = per_epoch.groupby("replicate")[col].sum().to_numpy()
        last = per_step.groupby("replicate")[col].last().to_numpy()
        np.testing.assert_allclose(summed, total[col], rtol=1e-12)
        np.testing.assert_allclose(last, total[col], rtol=1e-12)
        assert (per_step.groupby("replicate")[col].diff().dropna() >= 0).all()  # cumulative
    final = per_epoch[per_epoch["epoch"] == 2]["distance_from_init"].to_numpy()
    np.testing.assert_allclose(final, total["distance_from_init"], rtol=1e-12)


def test_closed_forms() -> None:
    steps = np.arange(6)
    fine = np.arange(1, 6)
    lr, err = np.full(5, 0.1), np.full((5, 2), 0.5)
    constant = np.ones((6, 2, 3))
    frame = trajectory.compute(steps, constant, fine, lr, err, steps_per_epoch=5)
    assert (frame[["length", "normalized_length", "distance_from_init", "step_variance"]].to_numpy() == 0).all()
    # A straight walk of one unit per step along one axis: length = distance = 5, normalized = 5 / (0.1 * 0.5).
    walk = np.zeros((6, 2, 3))
    walk[:, :, 0] = steps[:, None]
    frame = trajectory.compute(steps, walk, fine, lr, err, steps_per_epoch=5, last=2)
    np.testing.assert_allclose(frame["length"], 5.0)
    np.testing.assert_allclose(frame["distance_from_init"], 5.0)
    np.testing.assert_allclose(frame["normalized_length"], 100.0)
    np.testing.assert_allclose(frame["step_variance"], 0.25)  # var of {4, 5}


def test_unknown_param_names_the_recorded_ones(stores: list[StoreReader]) -> None:
    result = CliRunner().invoke(app, ["analyze", "trajectory", str(stores[0].path), "--param", "nope"])
    assert result.exit_code == 2
    assert "0.bias" in result.output


def test_several_stores_add_store_and_differing_keys(stores: list[StoreReader]) -> None:
    paths = [str(reader.path) for reader in stores]
    for args in (paths, [str(stores[0].path.parent)]):  # two stores, or the directory holding them
        result = CliRunner().invoke(app, ["analyze", "trajectory", *args, "--by", "epoch"])
        assert result.exit_code == 0, result.output
        table = pd.read_csv(io.StringIO(result.stdout))
        assert list(table.columns) == ["store", "data.freq", *trajectory.COLUMNS["epoch"]]
        assert sorted(table["data.freq"].unique()) == [1.0, 2.0]
        assert len(table) == 2 * 2 * 3
        one = trajectory.run(stores[1], by="epoch")
        mine = table[table["data.freq"] == 2.0].drop(columns=["store", "data.freq"]).reset_index(drop=True)
        np.testing.assert_allclose(mine["length"], one["length"], rtol=1e-12)


def test_several_stores_gsnr_streams_with_labels(tmp_path: Path, stores: list[StoreReader]) -> None:
    a = record(tmp_path / "g1.zarr", "record.grad_moments.every_epochs=1", "data.freq=1.0")
    b = record(tmp_path / "g2.zarr", "record.grad_moments.every_epochs=1", "data.freq=3.0", "train.lr=0.02")
    result = CliRunner().invoke(app, ["analyze", "gsnr", str(a.path), str(b.path)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns[:4]) == ["store", "data.freq", "train.lr", "step"]
    assert set(table["store"]) == {str(a.path), str(b.path)}
