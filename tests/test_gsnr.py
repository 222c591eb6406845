"""`analyze gsnr`: every column against the float64 loop references, closed forms, lazy reads, the CLI."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import one_error_line, run_cli
from reference import SHAPES, gsnr_summary, param_stats, random_grads, write_store

from gentrace.analyses import ANALYSES, gsnr
from gentrace.core.errors import AnalysisInputError, MissingStreamError
from gentrace.store.reader import StoreReader

RTOL = 1e-5
STEPS_PER_EPOCH = 4


@dataclass(frozen=True)
class Case:
    id: str
    replicates: int
    n: int
    steps: tuple[int, ...]
    zeros: float = 0.3


CASES = [
    Case("batch-of-1", replicates=1, n=1, steps=(0, 5)),  # one sample: every parameter has zero variance
    Case("M1-n7", replicates=1, n=7, steps=(0, 3, 9)),
    Case("M3-n5", replicates=3, n=5, steps=(0, 4, 8)),
    Case("M2-n9-mostly-zeros", replicates=2, n=9, steps=(2,), zeros=0.8),
]


def grads_of(case: Case, seed: int = 0) -> list[list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [[random_grads(rng, case.n, zeros=case.zeros) for _ in range(case.replicates)] for _ in case.steps]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Case, list[Any]]]:
    tmp = tmp_path_factory.mktemp("gsnr")
    out = {}
    for case in CASES:
        grads = grads_of(case)
        path = write_store(tmp / f"{case.id}.zarr", case.steps, grads, steps_per_epoch=STEPS_PER_EPOCH)
        out[case.id] = (path, case, grads)
    return out


def close(actual: float, expected: float) -> bool:
    return (math.isnan(actual) and math.isnan(expected)) or math.isclose(actual, expected, rel_tol=RTOL, abs_tol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_by_model_equals_reference(stores: dict[str, Any], case: Case) -> None:
    path, _, grads = stores[case.id]
    df = gsnr.run(StoreReader(path))
    assert list(df.columns) == gsnr.COLUMNS["model"]
    assert len(df) == len(case.steps) * case.replicates
    for row in df.itertuples(index=False):
        g = case.steps.index(row.step)
        expected = gsnr_summary(grads[g][row.replicate])
        assert row.epoch == row.step // STEPS_PER_EPOCH
        assert row.n == case.n
        assert row.zero_variance == expected["zero_variance"]
        for column in ("gsnr_mean", "gsnr_median", "same_sign"):
            assert close(getattr(row, column), expected[column]), (column, row, expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_by_layer_equals_reference(stores: dict[str, Any], case: Case) -> None:
    path, _, grads = stores[case.id]
    df = gsnr.run(StoreReader(path), by="layer")
    assert list(df.columns) == gsnr.COLUMNS["layer"]
    assert len(df) == len(case.steps) * case.replicates * len(SHAPES)
    for row in df.itertuples(index=False):
        g = case.steps.index(row.step)
        expected = gsnr_summary({row.layer: grads[g][row.replicate][row.layer]})
        assert row.zero_variance == expected["zero_variance"]
        for column in ("gsnr_mean", "gsnr_median", "same_sign"):
            assert close(getattr(row, column), expected[column]), (column, row, expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_by_param_equals_reference(stores: dict[str, Any], case: Case) -> None:
    path, _, grads = stores[case.id]
    df = gsnr.run(StoreReader(path), by="param")
    assert list(df.columns) == gsnr.COLUMNS["param"]
    per_step = sum(int(np.prod(s)) for s in SHAPES.values()) * case.replicates
    assert len(df) == len(case.steps) * per_step
    for (step, replicate, layer), part in df.groupby(["step", "replicate", "layer"], sort=False):
        stats = param_stats(grads[case.steps.index(step)][replicate][layer])
        assert part["index"].tolist() == list(range(len(stats)))
        second = np.array([s["var"] + s["mean"] ** 2 for s in stats])
        np.testing.assert_allclose(part["grad_mean"], [s["mean"] for s in stats], rtol=RTOL, atol=1e-7)
        # float32 sums leave ~2**-23 of the second moment as noise in the variance
        np.testing.assert_allclose(part["grad_var"], [s["var"] for s in stats], rtol=RTOL, atol=1e-6 * second.max())
        np.testing.assert_allclose(part["gsnr"], [s["gsnr"] for s in stats], rtol=RTOL, equal_nan=True)
        np.testing.assert_allclose(part["same_sign"], [s["same_sign"] for s in stats], rtol=1e-12, equal_nan=True)
        assert (part["grad_var"] >= 0).all()


def test_replicate_selects_rows(stores: dict[str, Any]) -> None:
    path, _, _ = stores["M3-n5"]
    reader = StoreReader(path)
    every = gsnr.run(reader, by="layer")
    one = gsnr.run(reader, by="layer", replicate=2)
    pd.testing.assert_frame_equal(one, every[every["replicate"] == 2].reset_index(drop=True))
    with pytest.raises(AnalysisInputError, match=r"replicates 0\.\.2; replicate 3"):
        gsnr.run(reader, replicate=3)


def test_compute_is_run_without_the_store(stores: dict[str, Any]) -> None:
    """The pure function on whole [G, M, *shape] arrays gives what run gives reading row by row."""
    path, case, _ = stores["M3-n5"]
    reader = StoreReader(path)
    tensors = reader.grad_tensor_names()
    arrays = {kind: {t: reader.array(f"grad/{t}/{kind}") for t in tensors} for kind in gsnr.KINDS}
    steps = reader.array("grad/step")
    for by in gsnr.BY:
        pure = gsnr.compute(
            arrays["sum"],
            arrays["sumsq"],
            arrays["pos"],
            arrays["neg"],
            reader.array("grad/n"),
            steps,
            steps // STEPS_PER_EPOCH,
            by=by,  # type: ignore[arg-type]
        )
        pd.testing.assert_frame_equal(pure, gsnr.run(reader, by=by))  # type: ignore[arg-type]
    assert ANALYSES["gsnr"] is gsnr.run


@pytest.mark.parametrize("n", [1, 7, 1000, 60_000])
@pytest.mark.parametrize("value", [0.1, 1 / 3, -7.3, 1e-3, 123.456, 2.0**-20])
def test_identical_per_sample_gradients_have_zero_variance(n: int, value: float) -> None:
    """Closed form: equal gradients give rho^2 = 0 exactly in float64, rounding noise in float32 moments.

    The moments are accumulated in float64 and stored as float32, as the recorder does.
    """
    g32 = np.float64(np.float32(value))  # the per-sample gradient as the model computes it
    shape = (2, 3)
    sum_g = {"w": np.full((1, 1, *shape), n * g32).astype(np.float32)}
    sumsq_g = {"w": np.full((1, 1, *shape), n * g32 * g32).astype(np.float32)}
    pos_g = {"w": np.full((1, 1, *shape), n if value > 0 else 0, np.int32)}
    neg_g = {"w": np.full((1, 1, *shape), 0 if value > 0 else n, np.int32)}
    args = (sum_g, sumsq_g, pos_g, neg_g, np.array([[n]]), np.array([0]), np.array([0]))
    model = gsnr.compute(*args)
    assert model.loc[0, "zero_variance"] == 6
    assert math.isnan(model.loc[0, "gsnr_mean"])
    assert math.isnan(model.loc[0, "gsnr_median"])
    assert model.loc[0, "same_sign"] == 1.0
    param = gsnr.compute(*args, by="param")
    assert (param["grad_var"] == 0).all()
    assert param["gsnr"].isna().all()
    np.testing.assert_allclose(param["grad_mean"], g32, rtol=1e-6)


def test_high_gsnr_is_still_resolved_in_float32() -> None:
    """GSNR ~1e3 (relative variance 1e-3, far above the 8 * 2**-23 tolerance) comes out to ~1e-3."""
    rng = np.random.default_rng(1)
    grads = 1.0 + 0.03 * rng.normal(size=(500, 4))
    stats = param_stats(grads)
    df = gsnr.compute(
        {"w": grads.sum(0)[None, None].astype(np.float32)},
        {"w": (grads**2).sum(0)[None, None].astype(np.float32)},
        {"w": (grads > 0).sum(0)[None, None]},
        {"w": (grads < 0).sum(0)[None, None]},
        np.array([[500]]),
        np.array([0]),
        np.array([0]),
        by="param",
    )
    assert (df["gsnr"] > 500).all()
    np.testing.assert_allclose(df["gsnr"], [s["gsnr"] for s in stats], rtol=1e-3)


def test_all_zero_tensor_is_left_out_of_same_sign(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    step = [random_grads(rng, 6) for _ in range(2)]
    for replicate in step:
        replicate["0.bias"][:] = 0.0  # e.g. a dead unit: no sample moves it
    store = write_store(tmp_path / "dead.zarr", [0], [step])
    reader = StoreReader(store)
    layer = gsnr.run(reader, by="layer").set_index(["replicate", "layer"])
    assert layer["same_sign"].loc[:, "0.bias"].isna().all()
    assert (layer["zero_variance"].loc[:, "0.bias"] == 3).all()
    model = gsnr.run(reader)
    for row in model.itertuples(index=False):
        expected = gsnr_summary(step[row.replicate])
        assert close(row.same_sign, expected["same_sign"])
        assert row.zero_variance == expected["zero_variance"] >= 3


def test_reads_one_row_at_a_time(stores: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays bounded by one block of one row: every read of a moment array asks for one row and replicate."""
    path, case, _ = stores["M3-n5"]
    reader = StoreReader(path)
    keys: list[tuple[str, Any]] = []
    lazy = StoreReader.lazy

    class Recording:
        def __init__(self, owner: StoreReader, path: str) -> None:
            self.path, self.array = path, lazy(owner, path)

        def __getitem__(self, key: Any) -> Any:
            keys.append((self.path, key))
            return self.array[key]

        def __getattr__(self, name: str) -> Any:
            return getattr(self.array, name)

    def recording(owner: StoreReader, path: str) -> Recording:
        return Recording(owner, path)

    monkeypatch.setattr(StoreReader, "lazy", recording)  # the tasks open their own readers
    gsnr.run(reader, by="layer")
    moment_reads = [key for path, key in keys if path.endswith(gsnr.KINDS)]
    assert len(moment_reads) == len(case.steps) * case.replicates * len(SHAPES) * 4
    for key in moment_reads:
        assert isinstance(key[0], int), key
        assert isinstance(key[1], int), key


def test_missing_stream_names_the_config_key(tmp_path: Path) -> None:
    store = write_store(tmp_path / "none.zarr", [], [], with_grad=False)
    with pytest.raises(MissingStreamError, match="no gradient moments; record them with record.grad_moments"):
        gsnr.run(StoreReader(store))


# -- the command line ------------------------------------------------------------------------------
def test_cli_csv_json_tsv_and_file(stores: dict[str, Any], tmp_path: Path) -> None:
    path, case, _ = stores["M3-n5"]
    reader = StoreReader(path)
    done = run_cli("analyze", "gsnr", path)
    assert done.returncode == 0, done.stderr
    csv = pd.read_csv(io.StringIO(done.stdout))
    assert list(csv.columns) == gsnr.COLUMNS["model"]
    pd.testing.assert_frame_equal(csv, gsnr.run(reader), check_dtype=False)

    done = run_cli("analyze", "gsnr", path, "--by", "layer", "--replicate", "1", "--format", "tsv")
    assert done.returncode == 0, done.stderr
    tsv = pd.read_csv(io.StringIO(done.stdout), sep="\t")
    assert list(tsv.columns) == gsnr.COLUMNS["layer"]
    assert set(tsv["replicate"]) == {1}
    assert len(tsv) == len(case.steps) * len(SHAPES)

    out = tmp_path / "params.json"
    done = run_cli("analyze", "gsnr", path, "--by", "param", "-f", "json", "-o", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n"  # the file written: the one line on stdout
    records = json.loads(out.read_text())
    assert list(records[0]) == gsnr.COLUMNS["param"]
    assert len(records) == len(gsnr.run(reader, by="param"))

    done = run_cli("analyze", "gsnr", path, "--format", "table")
    assert done.returncode == 0, done.stderr
    assert "gsnr_mean" in done.stdout
    assert "zero_variance" in done.stdout


def test_cli_errors_exit_2_with_one_line(stores: dict[str, Any], tmp_path: Path) -> None:
    none = write_store(tmp_path / "none.zarr", [], [], with_grad=False)
    done = run_cli("analyze", "gsnr", none)
    assert done.returncode == 2
    assert "record.grad_moments.every_epochs" in one_error_line(done.stderr)
    assert done.stdout == ""

    path, _, _ = stores["M3-n5"]
    for bad in (["--replicate", "7"], ["--replicate", "x"], ["--by", "tensor"], ["-f", "parquet"]):
        done = run_cli("analyze", "gsnr", path, *bad)
        assert done.returncode == 2, (bad, done.stderr)
        one_error_line(done.stderr)
        assert done.stdout == ""
