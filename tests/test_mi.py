"""`analyze mi`: every column against explicit counting, closed forms, the null model, the cache, the CLI."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import one_error_line, run_cli, tiny_config
from matplotlib.image import imread
from reference import entropy_by_counting, mi_by_counting

from gentrace.analyses import ANALYSES, information, mi, mi_references
from gentrace.core import config
from gentrace.reporting import plots
from gentrace.store import schema
from gentrace.store.lock import StoreLock
from gentrace.store.reader import StoreReader
from gentrace.training import run

SAMPLES = Path(__file__).resolve().parents[1] / "sample_configs"
RTOL, ATOL = 1e-9, 1e-12
QUANTITIES = ("mi_fy", "mi_ly", "mi_fy_given_l", "mi_ly_given_f", "mu")


@dataclass(frozen=True)
class Case:
    id: str
    k: int
    n: int
    steps: int
    agree: float  # how often F and L copy Y (0: independent uniform noise)


CASES = [
    Case("binary-n1", k=2, n=1, steps=2, agree=0.0),
    Case("binary-n50", k=2, n=50, steps=3, agree=0.7),
    Case("3-class-n200", k=3, n=200, steps=4, agree=0.5),
    Case("10-class-n500", k=10, n=500, steps=2, agree=0.3),
    Case("10-class-unused-classes", k=10, n=40, steps=3, agree=0.9),
]


def noisy_copy(rng: np.random.Generator, y: np.ndarray, k: int, agree: float) -> np.ndarray:
    return np.where(rng.random(y.shape) < agree, y, rng.integers(0, k, y.shape))


def arrays(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, min(case.k, 4) if "unused" in case.id else case.k, case.n)
    f = np.stack([noisy_copy(rng, y, case.k, case.agree) for _ in range(case.steps)])
    return f, y, noisy_copy(rng, y, case.k, case.agree)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_column_equals_explicit_counting(case: Case) -> None:
    f, y, l = arrays(case)  # noqa: E741
    steps = np.arange(case.steps) * 10
    df = mi.compute(f, y, l, steps, steps // 5, case.k, preds_train=f, labels_train=y)
    assert list(df.columns) == mi.COLUMNS
    for q, row in enumerate(df.itertuples(index=False)):
        expected = mi_by_counting(f[q], y, l)
        for column in QUANTITIES:
            assert math.isclose(getattr(row, column), expected[column], rel_tol=RTOL, abs_tol=ATOL), column
        assert math.isclose(row.mi_fy_train, expected["mi_fy"], rel_tol=RTOL, abs_tol=ATOL)
        assert row.acc == pytest.approx(float(np.mean(f[q] == y)))
        # Definition 1: both forms of mu agree exactly, since all come from one joint histogram.
        assert row.mu == pytest.approx(row.mi_ly - row.mi_ly_given_f, abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_closed_forms(case: Case) -> None:
    _, y, l = arrays(case)  # noqa: E741
    h_y = entropy_by_counting(y)
    same = mi.compute(y[None], y, l, np.array([0]), np.array([0]), case.k)
    assert same.mi_fy[0] == pytest.approx(h_y, abs=ATOL)  # I(Y;Y) = H(Y)
    constant = mi.compute(y[None], y, np.zeros_like(y), np.array([0]), np.array([0]), case.k)
    assert constant.mi_fy_given_l[0] == pytest.approx(constant.mi_fy[0], abs=ATOL)  # I(F;Y|L) = I(F;Y)
    assert constant.mu[0] == pytest.approx(0.0, abs=ATOL)
    assert constant.mi_ly[0] == pytest.approx(0.0, abs=ATOL)


@pytest.mark.parametrize("k", [2, 10])
def test_independent_variables_give_only_the_plug_in_bias(k: int) -> None:
    rng = np.random.default_rng(1)
    n = 10_000
    f, y = rng.integers(0, k, (20, n)), rng.integers(0, k, n)
    values = mi.compute(f, y, y, np.arange(20), np.arange(20), k).mi_fy.to_numpy()
    bias = (k - 1) ** 2 / (2 * n * math.log(2))  # Miller-Madow, the module docstring
    assert (values >= 0).all()
    assert values.mean() == pytest.approx(bias, rel=0.5)
    assert values.max() < 4 * bias


def test_null_model_matches_the_target_information() -> None:
    labels = np.array([300.0, 700.0])
    for target in (0.0, 0.1, 0.5, 0.8):
        p = mi.null_p(labels, target)
        assert information.null_information(labels, p) == pytest.approx(target, abs=1e-9)
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 1000)
    f = noisy_copy(rng, y, 2, 0.6)[None]
    fy = mi.joint_counts([f, y], 2)
    copy = mi.information(mi.null_counts(fy, 1.0))  # p = 1: L~ = Y, explains all of F's performance
    assert copy["mu"][0] == pytest.approx(copy["mi_fy"][0], abs=1e-12)
    noise = mi.information(mi.null_counts(fy, 0.0))  # p = 0: L~ is independent noise
    assert noise["mu"][0] == pytest.approx(0.0, abs=1e-12)


def test_null_model_is_the_expectation_over_draws() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    f = noisy_copy(rng, y, 3, 0.5)
    p = 0.4
    exact = mi.null_counts(mi.joint_counts([f[None], y], 3), p)[0]
    draws = np.zeros_like(exact)
    for _ in range(400):
        l = noisy_copy(rng, y, 3, p)  # noqa: E741
        draws += mi.joint_counts([f, y, l], 3)[0]
    assert np.allclose(draws / 400, exact, atol=1.5)


def test_first_reaching() -> None:
    assert mi.first_reaching(np.array([0.1, 0.3, 0.5, 0.4]), 0.3) == 1
    assert mi.first_reaching(np.array([0.1, 0.2]), 0.3) is None


# -- on recorded stores ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = config.load(SAMPLES / "mi-digits-binary.toml", ["train.epochs=3", "record.predictions.every_steps=0"])
    return run.record(cfg, tmp_path_factory.mktemp("mi") / "digits.zarr", device="cpu")


def test_registry_and_columns(digits: Path) -> None:
    df = ANALYSES["mi"](StoreReader(digits))
    assert list(df.columns) == mi.COLUMNS
    assert len(df) == 4  # initialization and 3 epochs
    assert df.mi_ly.nunique() == 1
    assert (df.mi_fy_train.notna()).all()


def test_reference_is_cached_and_reused(digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = StoreReader(digits)
    first = mi.run(reader)
    array = reader.lazy(f"{schema.DERIVED_MI_GROUP}/linear/test")
    assert array.shape == (1, 797)
    assert array.attrs["fitted_on_step"] == [-1]
    monkeypatch.setattr(mi_references, "_fit", lambda *args, **kwargs: pytest.fail("refitted a cached reference"))
    again = mi.run(reader)
    pd.testing.assert_frame_equal(first, again)
    train = mi_references.reference_predictions(reader, "linear", "train")
    assert train.shape == (1, 1000)


def test_fit_linear_is_fitted_on_t0_or_the_last_step(digits: Path) -> None:
    reader = StoreReader(digits)
    mi.run(reader, reference="fit-linear")
    array = reader.lazy(f"{schema.DERIVED_MI_GROUP}/fit-linear/test")
    assert array.attrs["fitted_on_step"][0] in set(reader.array("preds/step").tolist())


def test_read_only_store_computes_without_caching(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "ro.zarr"
    shutil.copytree(digits, copy)
    shutil.rmtree(copy / "derived", ignore_errors=True)
    # Tests may run as root, for whom chmod does not stop writes: deny the access check instead.
    monkeypatch.setattr(mi_references.os, "access", lambda *_: False)
    df = mi.run(StoreReader(copy), summary=True)
    assert not (copy / "derived").exists()
    assert list(df.columns) == mi.SUMMARY_COLUMNS


def test_store_held_by_a_live_writer_is_not_written(digits: Path, tmp_path: Path) -> None:
    copy = tmp_path / "live.zarr"
    shutil.copytree(digits, copy)
    shutil.rmtree(copy / "derived", ignore_errors=True)
    lock = StoreLock(copy)
    lock.acquire()
    try:
        assert len(mi.run(StoreReader(copy))) == 4
        assert not (copy / "derived").exists()
    finally:
        lock.release()


def test_null_reference_and_summary(digits: Path) -> None:
    reader = StoreReader(digits)
    linear = mi.run(reader, summary=True)
    null = mi.run(reader, reference="null", summary=True)
    assert linear.null_p[0] == pytest.approx(null.null_p[0])
    per_step = mi.run(reader, reference="null")
    assert per_step.mi_ly.to_numpy() == pytest.approx(linear.mi_ly[0], abs=1e-9)


def test_replicate_column_and_train_split(tmp_path: Path) -> None:
    cfg = config.load(SAMPLES / "mi-digits-binary.toml", ["train.epochs=1", "data.n_train=300", "train.replicates=2"])
    path = run.record(cfg, tmp_path / "two.zarr", device="cpu")
    df = mi.run(StoreReader(path))
    assert list(df.columns) == ["replicate", *mi.COLUMNS]
    assert sorted(df.replicate.unique()) == [0, 1]
    train = mi.run(StoreReader(path), split="train")
    assert np.allclose(train.mi_fy, train.mi_fy_train)  # on the train split F;Y is F;Y_S
    assert list(mi.run(StoreReader(path), summary=True).columns) == ["replicate", *mi.SUMMARY_COLUMNS]


def test_cnn_reference_on_vector_data_is_a_clear_error(tmp_path: Path) -> None:
    store = tmp_path / "tiny.zarr"
    assert run_cli("record", tiny_config(tmp_path), "--out", store, "--quiet").returncode == 0
    done = run_cli("analyze", "mi", store, "--reference", "cnn2")
    assert done.returncode == 2
    assert "image inputs" in one_error_line(done.stderr)


def test_regression_store_is_a_clear_error(tmp_path: Path) -> None:
    store = tmp_path / "reg.zarr"
    cfg = tiny_config(tmp_path, data={"name": "product", "dim": 2})
    assert run_cli("record", cfg, "--out", store, "--quiet").returncode == 0
    done = run_cli("analyze", "mi", store)
    assert done.returncode == 2
    assert "regression" in one_error_line(done.stderr)


def test_cli_table_summary_and_plot(digits: Path, tmp_path: Path) -> None:
    done = run_cli("analyze", "mi", digits)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ",".join(mi.COLUMNS)
    done = run_cli("analyze", "mi", digits, "--summary", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert "ratio_null" in done.stdout
    figure = tmp_path / "mi.png"
    done = run_cli("plot", "mi", digits, "-o", figure)
    assert done.returncode == 0, done.stderr
    height, width = imread(figure).shape[:2]
    assert (width, height) == (round(plots.MI_SIZE[0] * plots.DPI), round(plots.MI_SIZE[1] * plots.DPI))


def test_cifar_sample_config_is_valid() -> None:
    cfg = config.load(SAMPLES / "mi-cifar-first5.toml")
    assert cfg.data.name == "cifar10"
    assert cfg.data.task == "first5-vs-last5"
