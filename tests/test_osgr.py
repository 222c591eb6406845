"""`analyze osgr`: both sides of eq. 17 and eq. 20 against the float64 loop references, closed forms, CLI."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import one_error_line, run_cli
from reference import osgr_lhs, osgr_rhs, pearson, random_grads, write_store

from gentrace.analyses import ANALYSES, osgr
from gentrace.core.errors import AnalysisInputError, MissingStreamError
from gentrace.store.reader import StoreReader

RTOL = 1e-5
STEPS_PER_EPOCH = 5


@dataclass(frozen=True)
class Case:
    id: str
    replicates: int
    n: int
    grad_steps: tuple[int, ...]
    metric_steps: tuple[int, ...]


CASES = [
    Case("M2-n5-every-step", 2, 5, (0, 1, 2, 3), tuple(range(5))),
    Case("M4-n8-gaps", 4, 8, (0, 2, 5, 7), (0, 1, 2, 4, 5, 6, 7)),  # t=2: no row 3; t=7: no row 8
    Case("M3-n1", 3, 1, (0, 1), (0, 1, 2)),  # one sample each: rho^2 = 0, rhs = 1
]


def losses(rng: np.random.Generator, rows: int, replicates: int) -> tuple[np.ndarray, np.ndarray]:
    """Decreasing float32 train and test losses [R, M]."""
    train = (2.0 - np.cumsum(rng.uniform(0.01, 0.1, size=(rows, replicates)), axis=0)).astype(np.float32)
    test = (2.2 - np.cumsum(rng.uniform(0.0, 0.08, size=(rows, replicates)), axis=0)).astype(np.float32)
    return train, test


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Case, list[Any], np.ndarray, np.ndarray]]:
    tmp = tmp_path_factory.mktemp("osgr")
    out = {}
    rng = np.random.default_rng(0)
    for case in CASES:
        grads = [[random_grads(rng, case.n) for _ in range(case.replicates)] for _ in case.grad_steps]
        train, test = losses(rng, len(case.metric_steps), case.replicates)
        path = write_store(
            tmp / f"{case.id}.zarr",
            case.grad_steps,
            grads,
            steps_per_epoch=STEPS_PER_EPOCH,
            metric_steps=case.metric_steps,
            train_loss=train,
            test_loss=test,
        )
        out[case.id] = (path, case, grads, train, test)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_equals_reference(stores: dict[str, Any], case: Case) -> None:
    path, _, grads, train, test = stores[case.id]
    df = osgr.run(StoreReader(path))
    assert list(df.columns) == osgr.COLUMNS
    assert df["step"].tolist() == list(case.grad_steps)
    assert df["epoch"].tolist() == [t // STEPS_PER_EPOCH for t in case.grad_steps]
    assert (df["n"] == case.n).all()
    for g, row in enumerate(df.itertuples(index=False)):
        rhs, weighted = osgr_rhs(grads[g])
        assert math.isclose(row.osgr_rhs, rhs, rel_tol=RTOL), (row, rhs)
        assert math.isclose(row.osgr_rhs_weighted, weighted, rel_tol=RTOL), (row, weighted)
        lhs = osgr_lhs(row.step, case.metric_steps, train, test)
        assert (math.isnan(row.osgr_lhs) and math.isnan(lhs)) or math.isclose(row.osgr_lhs, lhs, rel_tol=1e-12)


def test_lhs_gaps_are_nan(stores: dict[str, Any]) -> None:
    path, *_ = stores["M4-n8-gaps"]
    df = osgr.run(StoreReader(path)).set_index("step")
    assert np.isfinite(df.loc[[0, 5], "osgr_lhs"]).all()
    assert df.loc[[2, 7], "osgr_lhs"].isna().all()


def test_one_sample_has_no_variance(stores: dict[str, Any]) -> None:
    """Closed form: with n = 1 every rho^2 is 0, so both right sides are exactly 1."""
    path, *_ = stores["M3-n1"]
    df = osgr.run(StoreReader(path))
    assert (df["osgr_rhs"] == 1.0).all()
    assert (df["osgr_rhs_weighted"] == 1.0).all()


def one_parameter(k: np.ndarray, rho2: np.ndarray, n: int) -> tuple[float, float]:
    """rhs and weighted rhs of a single parameter with per-replicate k [M] and rho^2 [M] (exact in float32)."""
    sums = {"w": (n * k)[None, :, None].astype(np.float32)}
    sumsqs = {"w": (n * (rho2 + k * k))[None, :, None].astype(np.float32)}
    rhs, weighted, _ = osgr.rhs(sums, sumsqs, np.full((1, len(k)), n))
    return float(rhs[0]), float(weighted[0])


def test_one_parameter_closed_form() -> None:
    """One parameter: W = 1, x = rho^2 / (n E k^2); rhs = 1 - x and weighted = 1 - x / (1 + x)."""
    k, rho2, n = np.array([0.5, 1.5]), np.array([2.0, 6.0]), 4
    rhs, weighted = one_parameter(k, rho2, n)
    x = rho2.mean() / (n * (k * k).mean())  # 4 / (4 * 1.25) = 0.8
    assert rhs == pytest.approx(1 - x, rel=1e-12)
    assert weighted == pytest.approx(1 - x / (1 + x), rel=1e-12)


def test_zero_mean_gradient_gives_nan() -> None:
    """sum_q E k^2 = 0 (every replicate at a stationary point): eq. 17 is 0/0."""
    rhs, weighted = one_parameter(np.zeros(2), np.ones(2), 4)
    assert math.isnan(rhs)
    assert math.isnan(weighted)


def test_unequal_n_across_replicates() -> None:
    sums = {"w": np.ones((1, 2, 3), np.float32)}
    with pytest.raises(AnalysisInputError, match="same number of samples"):
        osgr.rhs(sums, sums, np.array([[4, 5]]))


def test_compute_is_run_without_the_store(stores: dict[str, Any]) -> None:
    path, case, *_ = stores["M4-n8-gaps"]
    reader = StoreReader(path)
    tensors = reader.grad_tensor_names()
    steps = reader.array("grad/step")
    pure = osgr.compute(
        {t: reader.array(f"grad/{t}/sum") for t in tensors},
        {t: reader.array(f"grad/{t}/sumsq") for t in tensors},
        reader.array("grad/n"),
        steps,
        steps // STEPS_PER_EPOCH,
        reader.array("metrics/step"),
        reader.array("metrics/train_loss"),
        reader.array("metrics/test_loss"),
    )
    pd.testing.assert_frame_equal(pure, osgr.run(reader))
    assert ANALYSES["osgr"] is osgr.run


def test_pearson_closed_forms() -> None:
    rhs = np.array([0.1, 0.4, 0.2, 0.9, np.nan, 0.5])
    assert osgr.pearson(rhs, 2 * rhs + 1) == pytest.approx(1.0)
    assert osgr.pearson(rhs, -3 * rhs) == pytest.approx(-1.0)
    assert math.isnan(osgr.pearson(rhs, np.ones_like(rhs)))  # constant: undefined
    assert math.isnan(osgr.pearson(rhs[:1], rhs[:1]))
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=20), rng.normal(size=20)
    assert osgr.pearson(x, y) == pytest.approx(pearson(list(x), list(y)), rel=1e-12)


def test_summary_row() -> None:
    per_step = pd.DataFrame(
        {
            "step": [0, 1, 2, 3, 4],
            "epoch": [0, 0, 0, 0, 0],
            "osgr_lhs": [0.5, 0.6, np.nan, 0.8, 0.55],
            "osgr_rhs": [0.7, 0.8, 0.85, 1.0, 0.75],  # lhs = rhs - 0.2 where lhs is finite
            "osgr_rhs_weighted": [0.9, 0.7, 0.8, 0.6, 0.8],
            "n": [10] * 5,
        }
    )
    summary = osgr.summarize(per_step)
    assert list(summary.columns) == osgr.SUMMARY_COLUMNS
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row["pearson_r"] == pytest.approx(1.0)
    kept = [0, 1, 3, 4]
    expected = pearson([[0.5, 0.6, np.nan, 0.8, 0.55][i] for i in kept], [[0.9, 0.7, 0.8, 0.6, 0.8][i] for i in kept])
    assert row["pearson_r_weighted"] == pytest.approx(expected)
    assert row["n_steps"] == 4
    assert row["osgr_lhs_mean"] == pytest.approx(0.6125)
    assert row["osgr_rhs_mean"] == pytest.approx(0.8125)


def test_run_summary(stores: dict[str, Any]) -> None:
    path, *_ = stores["M2-n5-every-step"]
    reader = StoreReader(path)
    pd.testing.assert_frame_equal(osgr.run(reader, summary=True), osgr.summarize(osgr.run(reader)))


def test_needs_replicates(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    train, test = losses(rng, 3, 1)
    store = write_store(
        tmp_path / "one.zarr", [0], [[random_grads(rng, 4)]], metric_steps=(0, 1, 2), train_loss=train, test_loss=test
    )
    with pytest.raises(AnalysisInputError, match="train.replicates"):
        osgr.run(StoreReader(store))


def test_needs_per_step_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    train, test = losses(rng, 3, 2)
    grads = [[random_grads(rng, 4) for _ in range(2)] for _ in range(2)]
    store = write_store(
        tmp_path / "epochs.zarr", [0, 5], grads, metric_steps=(0, 5, 10), train_loss=train, test_loss=test
    )
    with pytest.raises(AnalysisInputError, match="record.eval_every_steps = 1"):
        osgr.run(StoreReader(store))


def test_needs_gradient_moments(tmp_path: Path) -> None:
    train, test = losses(np.random.default_rng(6), 3, 2)
    store = write_store(
        tmp_path / "none.zarr", [], [], metric_steps=(0, 1, 2), train_loss=train, test_loss=test, with_grad=False
    )
    with pytest.raises(MissingStreamError, match="record.grad_moments"):
        osgr.run(StoreReader(store))


def test_cli(stores: dict[str, Any], tmp_path: Path) -> None:
    path, *_ = stores["M2-n5-every-step"]
    reader = StoreReader(path)
    done = run_cli("analyze", "osgr", path)
    assert done.returncode == 0, done.stderr
    csv = pd.read_csv(io.StringIO(done.stdout))
    assert list(csv.columns) == osgr.COLUMNS
    pd.testing.assert_frame_equal(csv, osgr.run(reader), check_dtype=False)

    done = run_cli("analyze", "osgr", path, "--summary")
    assert done.returncode == 0, done.stderr
    summary = pd.read_csv(io.StringIO(done.stdout))
    assert list(summary.columns) == osgr.SUMMARY_COLUMNS
    assert len(summary) == 1

    rng = np.random.default_rng(7)
    train, test = losses(rng, 2, 1)
    one = write_store(
        tmp_path / "one.zarr", [0], [[random_grads(rng, 4)]], metric_steps=(0, 1), train_loss=train, test_loss=test
    )
    done = run_cli("analyze", "osgr", one)
    assert done.returncode == 2
    assert "train.replicates" in one_error_line(done.stderr)
    assert done.stdout == ""


# -- across settings: a tiny sweep of the sample config (the paper's Figure 1) --------------------------
SAMPLE = Path(__file__).resolve().parents[1] / "sample_configs" / "osgr-digits.toml"
N_TRAIN = (20, 40, 80)
HIDDEN = ([8], [32])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`gentrace sweep` of the sample config over data.n_train and model.hidden: 6 points, 2 epochs each."""
    out = tmp_path_factory.mktemp("osgr-sweep") / "sweep"
    done = run_cli(
        "sweep",
        SAMPLE,
        "--grid",
        f"data.n_train={','.join(map(str, N_TRAIN))}",
        "--grid",
        "model.hidden=" + ",".join(f"[{h[0]}]" for h in HIDDEN),
        "--set",
        "train.epochs=2",
        "--set",
        "record.grad_moments={every_steps=1, every_epochs=0}",
        "--set",
        "record.params={every_epochs=2}",
        "--set",
        "record.predictions={every_epochs=2}",
        "--out",
        out,
        "-q",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return out


def points_at(sweep: Path, step: int) -> np.ndarray:
    """[points, 2] (lhs, rhs) of each store at `step`, read store by store: the reference for the summary."""
    rows = []
    for n in N_TRAIN:
        for h in HIDDEN:
            frame = osgr.run(StoreReader(sweep / f"data.n_train={n},model.hidden=_{h[0]}_.zarr"))
            rows.append(frame[frame.step == step][["osgr_lhs", "osgr_rhs"]].to_numpy()[0])
    return np.array(rows)


def test_sweep_summary_is_one_row_per_point_and_the_r_across_them(sweep: Path) -> None:
    done = run_cli("analyze", "osgr", sweep, "--summary", "--format", "json")
    assert done.returncode == 0, done.stderr
    table = pd.read_json(io.StringIO(done.stdout))
    assert list(table.columns) == ["store", "data.n_train", "model.hidden", *osgr.ACROSS_COLUMNS]
    assert len(table) == len(N_TRAIN) * len(HIDDEN)
    assert list(table["data.n_train"]) == [n for n in N_TRAIN for _ in HIDDEN]
    assert list(table["model.hidden"]) == [f"[{h[0]}]" for _ in N_TRAIN for h in HIDDEN]
    assert (table["step"] == 0).all()  # the first step every store has
    want = points_at(sweep, 0)
    np.testing.assert_allclose(table[["osgr_lhs", "osgr_rhs"]].to_numpy(), want, rtol=1e-12)
    r = np.corrcoef(want[:, 0], want[:, 1])[0, 1]
    np.testing.assert_allclose(table["pearson_r_across"], r, rtol=1e-9)
    assert (table["n_points"] == len(table)).all()
    assert r > 0.8  # the paper's claim, on 6 tiny settings

    done = run_cli("analyze", "osgr", sweep, "--summary", "--step", "1", "--format", "json")
    assert done.returncode == 0, done.stderr
    at_one = pd.read_json(io.StringIO(done.stdout))
    assert (at_one["step"] == 1).all()
    np.testing.assert_allclose(at_one[["osgr_lhs", "osgr_rhs"]].to_numpy(), points_at(sweep, 1), rtol=1e-12)

    done = run_cli("analyze", "osgr", sweep, "--summary", "--step", "7")
    assert done.returncode == 2
    assert "no gradient row at step 7; give --step one of the recorded steps: 0, 1" in one_error_line(done.stderr)


def test_one_store_summary_with_step_is_refused(sweep: Path) -> None:
    store = sweep / "data.n_train=20,model.hidden=_8_.zarr"
    with pytest.raises(AnalysisInputError, match="--step with --summary compares several stores"):
        osgr.run(StoreReader(store), summary=True, step=0)
    only = osgr.run(StoreReader(store), step=1)
    assert list(only.columns) == osgr.COLUMNS
    assert list(only["step"]) == [1]


def test_sweep_plot_says_what_it_shows(sweep: Path, tmp_path: Path) -> None:
    from gentrace.reporting import plots
    from gentrace.training.sweep import expand_stores

    readers = [StoreReader(path) for path in expand_stores([sweep])]
    figure = plots.osgr_figure(readers)
    panels = figure.axes
    assert len(panels) == 2  # steps 0 and 1 have both sides in every store (2 epochs of full-batch steps)
    for axes, step in zip(panels, (0, 1), strict=True):
        lhs, rhs = points_at(sweep, step).T
        assert (
            axes.get_title() == f"step {step} (epoch {step})\nPearson r = {osgr.pearson(lhs, rhs):.3f} across 6 stores"
        )
        assert axes.get_ylabel().startswith("osgr_lhs")
        assert axes.get_xlabel().startswith("osgr_rhs")
    labels = [f"n_train={n}, hidden=[{h[0]}]" for n in N_TRAIN for h in HIDDEN]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [*labels, "lhs = rhs"]
    assert figure.get_suptitle().startswith("OSGR across settings")
    points = panels[0].collections  # colour = n_train, marker = width, as in the paper's Figure 1
    colours = [tuple(p.get_facecolor()[0]) for p in points]
    assert colours[0] == colours[1] != colours[2]
    assert not np.array_equal(points[0].get_paths()[0].vertices, points[1].get_paths()[0].vertices)
    one = plots.osgr_figure(readers, step=1)
    assert [axes.get_title().split("\n")[0] for axes in one.axes] == ["step 1 (epoch 1)"]

    out = tmp_path / "osgr.png"
    done = run_cli("plot", "osgr", sweep, "-o", out)  # a sweep directory, as `analyze` takes it
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 1000
