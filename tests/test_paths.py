"""`analyze paths`: every kind against float64 loop references on small random bitmasks, the store, the CLI, the plot.

The references unpack the stored bits with np.unpackbits and walk samples, pairs and units with
explicit Python loops, following SPEC section 5 word for word (|p| = sqrt of the count of ones).
Ranks compare overlaps as the float64 value dot / sqrt(c_i c_j) (the exact operations the
analysis documents), so that ties between equal paths resolve by index in both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import one_error_line, run_cli
from matplotlib.image import imread

from gentrace.analyses import ANALYSES, paths
from gentrace.core.errors import AnalysisInputError, MissingStreamError
from gentrace.reporting import plots
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.store.writer import RowBlock, create_store

RTOL = 1e-12
STEPS_PER_EPOCH = 3


# -- synthetic stores -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    probes: int
    units: Mapping[str, int]  # layer -> units
    epochs: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    density: float = 0.5
    lr: tuple[float, ...] = (0.1, 0.1, 0.1, 0.01, 0.01, 0.01)  # lr of each training epoch
    fine: bool = False  # lr from metrics_fine (every step) instead of metrics (every epoch)
    empty: tuple[tuple[int, int], ...] = ()  # (epoch row, probe) forced to an empty path


CASES = [
    Case("units-13-and-64", probes=7, units={"fc.0": 13, "fc.1": 64}, empty=((1, 2), (3, 2), (4, 0))),
    Case("sparse-units-37", probes=9, units={"relu@0": 37, "relu@1": 37}, density=0.08),  # empty products
    Case(
        "every-2-epochs-two-decays",
        probes=8,
        units={"conv": 203},
        epochs=(0, 2, 4, 5, 6, 8),
        lr=(0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001),
        fine=True,
        empty=((2, 5),),
    ),
]


def random_bits(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """layer -> [A, P, bytes] packed paths; probe 3 copies probe 4 (ties), forced empties."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer, units in case.units.items():
        on = rng.random((len(case.epochs), case.probes, units)) < case.density
        if case.probes > 4:
            on[:, 3] = on[:, 4]
        for a, p in case.empty:
            on[a, p] = False
        out[layer] = np.packbits(on, axis=-1, bitorder="little")
    return out


def lr_rows(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Recorded (step, lr): the lr at step s > 0 is the one of training epoch (s - 1) // spe."""
    total = len(case.lr) * STEPS_PER_EPOCH
    steps = np.arange(0, total + 1) if case.fine else np.arange(0, total + 1, STEPS_PER_EPOCH)
    lr = np.array([case.lr[0] if s == 0 else case.lr[(s - 1) // STEPS_PER_EPOCH] for s in steps])
    return steps, lr


def write_paths_store(path: Path, case: Case, layer_bits: Mapping[str, np.ndarray], *, acts: bool = True) -> Path:
    layers = {name: {"units": u, "shape": [u], "module": name.split("@")[0]} for name, u in case.units.items()}
    steps, lr = lr_rows(case)
    lr_stream = schema.metrics_fine_stream(len(steps), 1) if case.fine else schema.metrics_stream(len(steps), 1)
    streams = [lr_stream, *([schema.acts_stream(len(case.epochs), case.probes, layers, False)] if acts else [])]
    attrs = {"steps_per_epoch": STEPS_PER_EPOCH, "config": {}, "replicates": 1}
    writer = create_store(path, attrs, streams, {})
    writer.start()
    rows = len(steps)
    if case.fine:
        arrays = {"metrics_fine/step": steps, "metrics_fine/lr": lr}
        arrays |= {f"metrics_fine/{k}": np.zeros((rows, 1), np.float32) for k in ("batch_loss", "batch_error")}
        writer.put(RowBlock("metrics_fine", 0, arrays))
    else:
        arrays = {"metrics/step": steps, "metrics/epoch": (steps // STEPS_PER_EPOCH).astype(np.int32), "metrics/lr": lr}
        arrays |= {
            f"metrics/{k}": np.zeros((rows, 1), np.float32)
            for k in ("train_loss", "train_acc", "test_loss", "test_acc")
        }
        writer.put(RowBlock("metrics", 0, arrays))
    if acts:
        epochs = np.asarray(case.epochs)
        block = {"acts/step": epochs * STEPS_PER_EPOCH, "acts/epoch": epochs.astype(np.int32)}
        block |= {f"acts/{name}/bits": b for name, b in layer_bits.items()}
        writer.put(RowBlock("acts", 0, block))
    writer.close("complete")
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Case, dict[str, np.ndarray]]]:
    tmp = tmp_path_factory.mktemp("paths")
    out = {}
    for case in CASES:
        layer_bits = random_bits(case)
        out[case.id] = (write_paths_store(tmp / f"{case.id}.zarr", case, layer_bits), case, layer_bits)
    return out


# -- references: explicit loops in float64 ------------------------------------------------------------------
def unpacked(layer_bits: np.ndarray, units: int) -> list[list[list[int]]]:
    """[A, P, bytes] -> nested lists [A][P][units] of 0/1."""
    return np.unpackbits(layer_bits, axis=-1, count=units, bitorder="little").astype(int).tolist()


def dot(p: Sequence[int], q: Sequence[int]) -> float:
    return float(sum(float(a) * float(b) for a, b in zip(p, q, strict=True)))


def norm(p: Sequence[int]) -> float:
    return math.sqrt(sum(p))


def times(p: Sequence[int], q: Sequence[int]) -> list[int]:
    return [a * b for a, b in zip(p, q, strict=True)]


def ref_overlap(ps: list[list[int]]) -> dict[tuple[int, int], float]:
    out = {}
    for i in range(len(ps)):
        for j in range(i + 1, len(ps)):
            if norm(ps[i]) > 0 and norm(ps[j]) > 0:
                out[i, j] = dot(ps[i], ps[j]) / (norm(ps[i]) * norm(ps[j]))
    return out


def ref_cross(now: list[list[int]], before: list[list[int]]) -> dict[tuple[int, int], float]:
    out = {}
    for i in range(len(now)):
        for j in range(i + 1, len(now)):
            a, b = times(now[i], now[j]), times(before[i], before[j])
            if norm(a) > 0 and norm(b) > 0:
                out[i, j] = dot(a, b) / (norm(a) * norm(b))
    return out


def ref_self(now: list[list[int]], before: list[list[int]]) -> dict[tuple[int, int], float]:
    return {
        (i, i): dot(now[i], before[i]) / (norm(now[i]) * norm(before[i]))
        for i in range(len(now))
        if norm(now[i]) > 0 and norm(before[i]) > 0
    }


def ref_values(kind: str, ps: list[list[list[int]]], a: int) -> dict[tuple[int, int], float]:
    if kind == "overlap":
        return ref_overlap(ps[a])
    return (ref_cross if kind == "cross" else ref_self)(ps[a], ps[a - 1])


def ref_ranking(ps: list[list[int]]) -> list[list[tuple[int, float]]]:
    """For each base j: [(other, overlap)] nearest first; ties (equal float64 overlap) by index."""
    out = []
    for j in range(len(ps)):
        cj = sum(ps[j])
        scored = []
        for i in range(len(ps)):
            ci = sum(ps[i])
            if i != j and ci > 0 and cj > 0:
                scored.append((i, dot(ps[i], ps[j]) / math.sqrt(float(ci * cj))))
        out.append(sorted(scored, key=lambda s: (-s[1], s[0])))
    return out


def ref_cross_means(ps: list[list[list[int]]], epochs: Sequence[int]) -> dict[int, float]:
    means = {}
    for a in range(1, len(epochs)):
        values = list(ref_cross(ps[a], ps[a - 1]).values())
        if values:
            means[epochs[a]] = sum(values) / len(values)
    return means


def expected_summary(values: list[float]) -> tuple[float, float, float, float]:
    v = sorted(values)

    def quantile(q: float) -> float:  # linear interpolation between order statistics
        pos = q * (len(v) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return sum(v) / len(v), quantile(0.1), quantile(0.5), quantile(0.9)


# -- overlap, cross, self ------------------------------------------------------------------------------------
KINDS3 = ["overlap", "cross", "self"]


@pytest.mark.parametrize("kind", KINDS3)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_summary_equals_reference(stores: dict[str, Any], case: Case, kind: str) -> None:
    path, _, layer_bits = stores[case.id]
    df = paths.run(StoreReader(path), kind=kind)  # type: ignore[arg-type]
    assert list(df.columns) == paths.COLUMNS
    first = 0 if kind == "overlap" else 1
    assert len(df) == len(case.units) * (len(case.epochs) - first)
    assert not df[["mean", "q10", "q50", "q90"]].isna().to_numpy().any()
    for row in df.itertuples(index=False):
        a = case.epochs.index(row.epoch)
        ps = unpacked(layer_bits[row.layer], case.units[row.layer])
        values = list(ref_values(kind, ps, a).values())
        assert row.kind == kind
        assert row.n == len(values)
        p = case.probes
        if kind == "overlap":
            assert row.empty == sum(1 for q in ps[a] if sum(q) == 0)
        elif kind == "cross":
            assert row.empty == p * (p - 1) // 2 - len(values)
        else:
            assert row.empty == p - len(values)
        for got, want in zip((row.mean, row.q10, row.q50, row.q90), expected_summary(values), strict=True):
            assert math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-15), (row, values)


@pytest.mark.parametrize("kind", KINDS3)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pairs_equal_reference(stores: dict[str, Any], case: Case, kind: str) -> None:
    path, _, layer_bits = stores[case.id]
    df = paths.run(StoreReader(path), kind=kind, pairs=True)  # type: ignore[arg-type]
    assert list(df.columns) == paths.PAIR_COLUMNS
    assert np.isfinite(df["value"]).all()
    for (epoch, layer), part in df.groupby(["epoch", "layer"], sort=False):
        ps = unpacked(layer_bits[layer], case.units[layer])
        expected = ref_values(kind, ps, case.epochs.index(epoch))
        got = {(int(i), int(j)): v for i, j, v in zip(part["i"], part["j"], part["value"], strict=True)}
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert math.isclose(got[key], value, rel_tol=RTOL, abs_tol=1e-15), key
        assert all(0.0 <= v <= 1.0 + 1e-12 for v in got.values())


def test_sparse_case_has_empty_products(stores: dict[str, Any]) -> None:
    """The sparse case exercises the empty-path convention: some pairs and samples are left out."""
    path, _, _ = stores["sparse-units-37"]
    reader = StoreReader(path)
    assert (paths.run(reader, kind="cross")["empty"] > 0).all()
    assert (paths.run(reader, kind="overlap")["empty"] > 0).any()


def test_closed_forms() -> None:
    """Equal paths at t and s: self = 1 and cross = 1; disjoint paths: overlap = 0 (defined)."""
    on = np.random.default_rng(1).random((6, 50)) < 0.5
    on[:, :2] = True  # no empty product path
    rows = [np.packbits(on, axis=-1, bitorder="little")] * 3
    for kind in ("self", "cross"):
        df = pd.concat(list(paths.layer_frames("l", [0, 1, 2], rows, kind, pairs=True)))  # type: ignore[arg-type]
        np.testing.assert_allclose(df["value"], 1.0, rtol=1e-15)
    disjoint = np.zeros((2, 16), dtype=bool)
    disjoint[0, :8] = disjoint[1, 8:] = True
    df = pd.concat(list(paths.layer_frames("l", [0], [np.packbits(disjoint, axis=-1, bitorder="little")])))
    assert df[["mean", "n", "empty"]].to_numpy().tolist() == [[0.0, 1, 0]]


def test_all_paths_empty_gives_n_0_without_nan_values() -> None:
    rows = [np.zeros((4, 2), np.uint8)] * 2
    for kind in KINDS3:
        summary = pd.concat(list(paths.layer_frames("l", [0, 1], rows, kind)))  # type: ignore[arg-type]
        assert (summary["n"] == 0).all()
        assert summary["empty"].tolist()[-1] == (6 if kind == "cross" else 4)
        pairs = list(paths.layer_frames("l", [0, 1], rows, kind, pairs=True))  # type: ignore[arg-type]
        assert all(len(p) == 0 for p in pairs)


# -- rank ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rank_equals_reference(stores: dict[str, Any], case: Case) -> None:
    path, _, layer_bits = stores[case.id]
    reader = StoreReader(path)
    summary = paths.run(reader, kind="rank")
    pairs = paths.run(reader, kind="rank", pairs=True)
    assert list(summary.columns) == paths.RANK_COLUMNS
    assert list(pairs.columns) == paths.RANK_PAIR_COLUMNS
    for layer, units in case.units.items():
        ps = unpacked(layer_bits[layer], units)
        changes = [0] * case.probes
        previous: list[set[int]] | None = None
        for a, epoch in enumerate(case.epochs):
            ranking = ref_ranking(ps[a])
            sets = [{i for i, _ in r[: paths.NEAREST]} for r in ranking]
            rows = summary[(summary["layer"] == layer) & (summary["epoch"] == epoch)]
            assert rows["base"].tolist() == list(range(case.probes))
            for j, row in enumerate(rows.itertuples(index=False)):
                changed = 0 if previous is None else int(sets[j] != previous[j])
                changes[j] += changed
                assert row.neighbours == " ".join(str(i) for i, _ in ranking[j][: paths.NEAREST])
                assert row.n == len(ranking[j])
                assert row.changed == changed
                assert row.sym_diff == (0 if previous is None else len(sets[j] ^ previous[j]))
                assert row.changes == changes[j]
                assert row.empty == sum(1 for q in ps[a] if sum(q) == 0)
            previous = sets
            got = pairs[(pairs["layer"] == layer) & (pairs["epoch"] == epoch)]
            expected = [(j, i, ov, r) for j in range(case.probes) for r, (i, ov) in enumerate(ranking[j])]
            assert list(zip(got["base"], got["other"], got["rank"], strict=True)) == [
                (j, i, r) for j, i, _, r in expected
            ]
            np.testing.assert_allclose(got["overlap"], [ov for *_, ov, _ in expected], rtol=RTOL)


def test_rank_ties_by_index_and_bases(stores: dict[str, Any]) -> None:
    """Probes 3 and 4 share a path: every other base ranks 3 right before 4; `bases` selects rows only."""
    path, case, _ = stores["units-13-and-64"]
    reader = StoreReader(path)
    pairs = paths.run(reader, layer="fc.1", kind="rank", pairs=True)
    for (_, base), part in pairs.groupby(["epoch", "base"]):
        if base not in (3, 4):
            order = part.sort_values("rank")["other"].tolist()
            assert order.index(4) == order.index(3) + 1
    some = paths.run(reader, layer="fc.1", kind="rank", bases=[5, 0])
    every = paths.run(reader, layer="fc.1", kind="rank")
    assert some["base"].tolist() == [5, 0] * len(case.epochs)
    expected = pd.concat([every[every["base"] == b] for b in (5, 0)]).sort_values("epoch", kind="stable")
    pd.testing.assert_frame_equal(some, expected.reset_index(drop=True))


# -- ratio --------------------------------------------------------------------------------------------------
def ref_decays(lr: Sequence[float]) -> list[int]:
    return [e for e in range(1, len(lr)) if lr[e] < lr[e - 1]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ratio_equals_reference(stores: dict[str, Any], case: Case) -> None:
    path, _, layer_bits = stores[case.id]
    df = paths.run(StoreReader(path), kind="ratio")
    assert list(df.columns) == paths.RATIO_COLUMNS
    decays = ref_decays(case.lr)
    d1, d2 = decays[0], decays[1] if len(decays) > 1 else math.inf
    for row in df.itertuples(index=False):
        means = ref_cross_means(unpacked(layer_bits[row.layer], case.units[row.layer]), case.epochs)
        previous = dict(zip(case.epochs[1:], case.epochs, strict=False))
        early = [m for t, m in means.items() if t <= d1]
        mid = [m for t, m in means.items() if previous[t] >= d1 and t <= d2]
        assert row.decay_epoch == d1
        assert (row.early_epochs, row.mid_epochs) == (len(early), len(mid))
        assert math.isclose(row.early_mean, sum(early) / len(early), rel_tol=RTOL)
        assert math.isclose(row.mid_mean, sum(mid) / len(mid), rel_tol=RTOL)
        assert math.isclose(row.ratio, row.early_mean / row.mid_mean, rel_tol=RTOL)
        assert math.isfinite(row.ratio)


def test_ratio_windows_with_sparse_epochs(stores: dict[str, Any]) -> None:
    """Epochs 0, 2, 4, 5, 6, 8, decays at 3 and 6: (0,2] early; (2,4] straddles 3; (4,5], (5,6] mid; (6,8] later."""
    path, _, _ = stores["every-2-epochs-two-decays"]
    reader = StoreReader(path)
    assert paths.decay_epochs(paths.recorded_lr(reader)) == [3, 6]
    row = paths.run(reader, kind="ratio").iloc[0]
    assert (row["decay_epoch"], row["early_epochs"], row["mid_epochs"]) == (3, 1, 2)


def test_lr_by_epoch() -> None:
    steps = np.array([0, 3, 6, 9, 12])
    lr = np.array([0.1, 0.1, 0.1, 0.01, 0.01])
    assert paths.lr_by_epoch(steps, lr, 3) == {0: 0.1, 1: 0.1, 2: 0.01, 3: 0.01}
    assert paths.decay_epochs({0: 0.1, 1: 0.1, 2: 0.01, 3: 0.01, 4: 0.02, 5: 0.001}) == [2, 5]


def test_no_decay_is_a_clear_error(tmp_path: Path) -> None:
    case = Case("flat", probes=4, units={"l": 9}, lr=(0.1,) * 6)
    path = write_paths_store(tmp_path / "flat.zarr", case, random_bits(case))
    with pytest.raises(AnalysisInputError, match="no learning-rate decay; set train.lr_decay.every_epochs"):
        paths.run(StoreReader(path), kind="ratio")


def test_decay_outside_the_recorded_epochs(tmp_path: Path) -> None:
    case = Case("late", probes=4, units={"l": 9}, epochs=(0, 1, 2), lr=(0.1, 0.1, 0.1, 0.1, 0.01, 0.01))
    path = write_paths_store(tmp_path / "late.zarr", case, random_bits(case))
    with pytest.raises(AnalysisInputError, match="no recorded pair of epochs after the first learning-rate decay"):
        paths.run(StoreReader(path), kind="ratio")


# -- the store: errors, pure = run --------------------------------------------------------------------------
def test_missing_acts_names_the_config_key(tmp_path: Path) -> None:
    case = Case("no-acts", probes=4, units={"l": 9})
    path = write_paths_store(tmp_path / "no-acts.zarr", case, {}, acts=False)
    with pytest.raises(
        MissingStreamError, match="no activation bitmasks; record them with record.activations.every_epochs"
    ):
        paths.run(StoreReader(path))


def test_unknown_layer_and_kind(stores: dict[str, Any]) -> None:
    reader = StoreReader(stores["units-13-and-64"][0])
    with pytest.raises(AnalysisInputError, match=r"no activation bitmasks for layer 'fc\.9'; layers: fc\.0, fc\.1"):
        paths.run(reader, layer="fc.9")
    with pytest.raises(AnalysisInputError, match="kind must be one of"):
        paths.run(reader, kind="gram")  # type: ignore[arg-type]
    with pytest.raises(AnalysisInputError, match="--pairs has no rows for kind ratio"):
        paths.run(reader, kind="ratio", pairs=True)


def test_layer_selects_rows_and_pure_equals_run(stores: dict[str, Any]) -> None:
    path, case, layer_bits = stores["units-13-and-64"]
    reader = StoreReader(path)
    assert ANALYSES["paths"] is paths.run
    every = paths.run(reader, kind="cross")
    one = paths.run(reader, layer="fc.1", kind="cross")
    pd.testing.assert_frame_equal(one, every[every["layer"] == "fc.1"].reset_index(drop=True))
    pure = pd.concat(list(paths.layer_frames("fc.1", case.epochs, layer_bits["fc.1"], "cross")), ignore_index=True)
    pd.testing.assert_frame_equal(pure, one)
    for method_device in ("cpu",):
        same = paths.run(reader, layer="fc.1", kind="cross", device=method_device)
        pd.testing.assert_frame_equal(same, one)


# -- CLI and plot -------------------------------------------------------------------------------------------
def test_cli_analyze(stores: dict[str, Any], tmp_path: Path) -> None:
    path, case, _ = stores["units-13-and-64"]
    done = run_cli("analyze", "paths", path, "--kind", "self", "--layer", "fc.0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ",".join(paths.COLUMNS)
    assert len(lines) == len(case.epochs)  # header + one row per epoch after the first
    out = tmp_path / "pairs.json"
    done = run_cli("analyze", "paths", path, "--kind", "rank", "--pairs", "--format", "json", "-o", out)
    assert done.returncode == 0, done.stderr
    df = pd.read_json(out)
    assert list(df.columns) == paths.RANK_PAIR_COLUMNS
    pd.testing.assert_frame_equal(
        df[["base", "other", "rank"]], paths.run(StoreReader(path), kind="rank", pairs=True)[["base", "other", "rank"]]
    )


def test_cli_errors(tmp_path: Path) -> None:
    case = Case("no-acts", probes=4, units={"l": 9}, lr=(0.1,) * 6)
    path = write_paths_store(tmp_path / "no-acts.zarr", case, {}, acts=False)
    done = run_cli("analyze", "paths", path, "--kind", "ratio")
    assert done.returncode == 2
    assert "record.activations.every_epochs" in one_error_line(done.stderr)
    flat = write_paths_store(tmp_path / "flat.zarr", Case("flat", 4, {"l": 9}, lr=(0.1,) * 6), random_bits(case))
    done = run_cli("analyze", "paths", flat, "--kind", "ratio")
    assert done.returncode == 2
    assert one_error_line(done.stderr).endswith("this run has no learning-rate decay; set train.lr_decay.every_epochs")
    if not torch.cuda.is_available():
        done = run_cli("analyze", "paths", flat, "--device", "cuda")
        assert done.returncode == 2
        assert "torch sees no CUDA GPU" in one_error_line(done.stderr)


def test_plot(stores: dict[str, Any], tmp_path: Path) -> None:
    path, _, _ = stores["units-13-and-64"]
    out = plots.plot_paths([StoreReader(path)], tmp_path / "paths.png")
    height, width = imread(out).shape[:2]
    assert (width, height) == (round(plots.PATHS_SIZE[0] * plots.DPI), round(plots.PATHS_SIZE[1] * plots.DPI))
    figure = tmp_path / "cli.png"
    done = run_cli("plot", "paths", path, stores["sparse-units-37"][0], "--layer", "fc.1", "-o", figure)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{figure}\n"  # the figure written: the one line on stdout
    assert imread(figure).shape[:2] == (height, width)
    done = run_cli("plot", "paths", path, "--layer", "nope", "-o", figure)
    assert done.returncode == 2
    assert "layer 'nope'" in one_error_line(done.stderr)
