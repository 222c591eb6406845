"""gentrace.reporting.plots and `gentrace plot`: every figure says what it shows, read off matplotlib's objects.

For each figure: titles, axis labels, legend texts (stores named by their swept config value,
layers by call site, module type and shape) and integer ticks on step and epoch axes; plus the PNG's
documented pixel size. Figures are checked through `fig.axes`, not pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import one_error_line, run_cli
from matplotlib.image import imread
from matplotlib.ticker import MaxNLocator
from reference import random_grads, write_store

from gentrace.analyses import gsnr
from gentrace.core import config
from gentrace.reporting import plots
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.store.writer import create_store
from gentrace.training import run

# Two digits runs that differ only in data.n_train and record every stream the figures read, in seconds.
RECORDED = [
    "data.n_test=120",
    "model.hidden=[16, 16]",
    "train.epochs=3",
    "train.batch_size=20",
    "train.lr_decay={every_epochs=0}",
    "record.checkpoint_every_s=0",
    "record.params={every_epochs=1, names='all'}",
    "record.activations={every_epochs=1, probe=20, layers='relu'}",
]
N_TRAIN = (40, 60)


def pixel_size(path: Path) -> tuple[int, int]:
    height, width = imread(path).shape[:2]
    return width, height


def legend_texts(axes: Any) -> list[str]:
    legend = axes.get_legend()
    assert legend is not None, axes.get_title()
    return [text.get_text() for text in legend.get_texts()]


def assert_integer_ticks(axes: Any) -> None:
    locator = axes.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator)
    ticks = locator.tick_values(*axes.get_xlim())
    assert np.allclose(ticks, np.round(ticks)), ticks


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two gradient-moment stores without a config (written directly): named by their directory names."""
    tmp = tmp_path_factory.mktemp("plots")
    rng = np.random.default_rng(0)
    out = []
    for name, spread in (("real", 0.5), ("random", 3.0)):
        grads = [[{k: v * spread for k, v in random_grads(rng, 6).items()} for _ in range(2)] for _ in range(4)]
        train = (2 - np.cumsum(rng.uniform(0.05, 0.1, (5, 2)), axis=0)).astype(np.float32)
        test = (2 - np.cumsum(rng.uniform(0.0, 0.1, (5, 2)), axis=0)).astype(np.float32)
        out.append(
            write_store(
                tmp / f"{name}.zarr", [0, 1, 2, 3], grads, metric_steps=range(5), train_loss=train, test_loss=test
            )
        )
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> list[StoreReader]:
    root = tmp_path_factory.mktemp("recorded")
    return [
        StoreReader(run.record(config.load(None, [*RECORDED, f"data.n_train={n}"]), root / f"s{n}.zarr", device="cpu"))
        for n in N_TRAIN
    ]


def test_run_labels_name_the_swept_value(recorded: list[StoreReader], synthetic: list[Path]) -> None:
    assert plots.run_labels(recorded) == [f"n_train={n}" for n in N_TRAIN]
    assert plots.run_labels(recorded[:1]) == ["s40"]  # one store: its name
    assert plots.run_labels([StoreReader(s) for s in synthetic]) == ["real", "random"]  # no config differs


def test_layer_label_has_module_type_and_shape(recorded: list[StoreReader], tmp_path: Path) -> None:
    reader = recorded[0]
    assert [plots.layer_label(reader, layer) for layer in reader.act_layers()] == ["1 ReLU 16", "3 ReLU 16"]
    cnn = config.load(
        None,
        [
            *RECORDED,
            "data.n_train=20",
            "model.arch='cnn'",
            "model.channels=4",
            "model.hidden=[16]",
            "train.epochs=1",
            "record.grad_moments={every_epochs=0}",
        ],
    )
    path = run.record(cnn, tmp_path / "cnn.zarr", device="cpu")
    labels = [plots.layer_label(StoreReader(path), layer) for layer in StoreReader(path).act_layers()]
    assert labels[0].split(" ")[1] == "ReLU"
    assert all(len(label.split(" ")[2].split("x")) == 3 for label in labels[:2]), labels  # C x H x W after a conv
    assert labels[-1].endswith("ReLU 16"), labels


def test_gsnr_figure(recorded: list[StoreReader], tmp_path: Path) -> None:
    figure = plots.gsnr_figure(recorded)
    left, right = figure.axes
    assert left.get_title() == "GSNR (eq. 1)"
    assert left.get_xlabel() == "step"
    assert right.get_ylabel() == "same-sign fraction"
    assert legend_texts(left) == [f"n_train={n}" for n in N_TRAIN]
    assert legend_texts(right) == [*(f"n_train={n}" for n in N_TRAIN), "0.5 (random signs)"]
    for axes in figure.axes:
        assert_integer_ticks(axes)
    out = plots.save(figure, tmp_path / "gsnr.png")
    assert pixel_size(out) == (1000, 400)


def test_mi_figure_labels_t0(recorded: list[StoreReader]) -> None:
    figure = plots.mi_figure(recorded[:1])
    axes = figure.axes[0]
    assert axes.get_xlabel() == "SGD step"
    assert "T0" in axes.get_title()
    texts = legend_texts(axes)
    assert texts[:3] == ["I(F_t;Y)", "mu(F_t;L)", "I(L;Y) (linear)"]
    t0 = [t for t in texts if t.startswith("T0 = step ")]
    assert len(t0) <= 1
    if t0:  # the dotted vertical line sits at the step its label names
        step = int(t0[0].removeprefix("T0 = step "))
        assert any(list(line.get_xdata()) == [step, step] for line in axes.get_lines())
    assert_integer_ticks(axes)
    several = plots.mi_figure(recorded)
    assert legend_texts(several.axes[0])[0] == "n_train=40: I(F_t;Y)"


def test_mi_t0_line_is_labelled(recorded: list[StoreReader], monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose I(F_t;Y) reaches I(L;Y) at step 20: the vertical line there reads `T0 = step 20`."""
    table = pd.DataFrame(
        {
            "step": [0, 10, 20, 30],
            "mi_fy": [0.1, 0.5, 1.2, 1.4],
            "mu": [0.1, 0.4, 0.9, 1.0],
            "mi_ly": 1.0,
            "acc": [0.1, 0.5, 0.8, 0.9],
        }
    )
    monkeypatch.setattr(plots.mi, "run", lambda reader, reference: table)
    axes = plots.mi_figure(recorded[:1]).axes[0]
    assert legend_texts(axes)[-1] == "T0 = step 20"
    (line,) = [line for line in axes.get_lines() if line.get_label() == "T0 = step 20"]
    assert list(line.get_xdata()) == [20, 20]


def test_paths_figure(recorded: list[StoreReader], tmp_path: Path) -> None:
    figure = plots.paths_figure(recorded)
    cross, self_, changes, *bases = figure.axes
    assert cross.get_title().startswith("cross path similarity")
    assert self_.get_title().startswith("self similarity")
    layers = ["1 ReLU 16", "3 ReLU 16"]
    assert legend_texts(cross) == [f"n_train={n}: {layer}" for n in N_TRAIN for layer in layers]
    assert cross.get_legend().get_title().get_text() == "layer: call site, module, shape"
    assert changes.get_title() == "nearest-6 set changes per epoch\n3 ReLU 16"
    assert legend_texts(changes) == ["base 5", "base 10", "base 15"]
    assert len(bases) == 3
    for base, axes in zip((5, 10, 15), bases, strict=True):
        assert axes.get_title() == f"base {base}: rank of its final {plots.HIGHLIGHTED} nearest\n3 ReLU 16"
        texts = legend_texts(axes)
        assert len(texts) == plots.HIGHLIGHTED
        assert all(t.startswith("probe ") for t in texts)
        colours = {line.get_color() for line in axes.get_lines()}
        assert len(colours) == 1  # one colour per base, told apart by linestyle: no repeated-colour spaghetti
        assert len({line.get_linestyle() for line in axes.get_lines()}) == plots.HIGHLIGHTED
        assert [t.get_text() for t in axes.get_yticklabels()][-1] == "6+"
    for axes in figure.axes:
        assert axes.get_xlabel().startswith("epoch")
        assert_integer_ticks(axes)
    out = plots.save(figure, tmp_path / "paths.png")
    assert pixel_size(out) == (round(plots.PATHS_SIZE[0] * plots.DPI), round(plots.PATHS_SIZE[1] * plots.DPI))


def test_layer_label_of_a_store_without_attrs(tmp_path: Path) -> None:
    """A store written before module_type and shape were stored: the bare call-site name."""
    writer = create_store(
        tmp_path / "old.zarr", {"config": {}}, [schema.acts_stream(1, 4, {"4": {"units": 9}}, False)], {}
    )
    writer.start()
    writer.close("complete")
    reader = StoreReader(tmp_path / "old.zarr")
    assert plots.layer_label(reader, "4") == "4"
    assert plots.layer_label(reader, "7") == "7"  # no such layer at all


def test_trajectory_figure_names_the_tensor(recorded: list[StoreReader]) -> None:
    figure = plots.trajectory_figure(recorded)
    left, right = figure.axes
    assert left.get_title() == "cumulative length of 0.bias"
    assert right.get_title() == "0.bias: distance from initialization"
    assert legend_texts(left) == [f"n_train={n}" for n in N_TRAIN]
    assert_integer_ticks(left)
    assert_integer_ticks(right)


def test_lipschitz_figure_says_which_far_set(recorded: list[StoreReader]) -> None:
    figure = plots.lipschitz_figure(recorded)
    near, far = figure.axes
    assert near.get_title() == "local Lipschitz constant at training points"
    assert far.get_title() == "far: Gaussian fit x3 (solid), midpoints of pairs (dashed)"
    assert legend_texts(near) == [f"n_train={n}" for n in N_TRAIN]
    assert legend_texts(far) == [f"n_train={n}: {where}" for n in N_TRAIN for where in ("far-gaussian", "far-midpoint")]
    assert [line.get_linestyle() for line in far.get_lines()] == ["-", "--", "-", "--"]
    assert_integer_ticks(near)
    assert_integer_ticks(far)
    alone = plots.lipschitz_figure(recorded[:1])
    assert legend_texts(alone.axes[1]) == ["far-gaussian", "far-midpoint"]


def test_columns_figure(recorded: list[StoreReader]) -> None:
    figure = plots.columns_figure(recorded, lambda r: gsnr.run(r), ["gsnr_median"], "gsnr")
    (axes,) = figure.axes
    assert axes.get_title() == "gsnr: gsnr_median"
    assert legend_texts(axes) == [f"n_train={n}" for n in N_TRAIN]
    assert_integer_ticks(axes)


def test_osgr_one_store_is_coloured_by_step_without_a_correlation(synthetic: list[Path], tmp_path: Path) -> None:
    figure = plots.osgr_figure([StoreReader(synthetic[0])])
    axes, bar = figure.axes
    assert axes.get_title() == "OSGR per recorded step of one run\nreal"
    assert bar.get_ylabel() == "step"
    assert legend_texts(axes) == ["recorded step", "lhs = rhs"]
    (points,) = axes.collections
    assert list(points.get_array()) == [0, 1, 2, 3]  # the colour of each point is its step
    out = plots.save(figure, tmp_path / "osgr.png")
    assert pixel_size(out) == (round(plots.OSGR_SIZE[0] * plots.DPI), round(plots.OSGR_SIZE[1] * plots.DPI))


def test_osgr_two_stores_have_no_r(synthetic: list[Path]) -> None:
    figure = plots.osgr_figure([StoreReader(s) for s in synthetic], step=1)
    (axes,) = figure.axes
    assert axes.get_title() == "step 1 (epoch 0)\n2 stores"  # no Pearson r of two points
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["real", "random", "lhs = rhs"]


def test_cli(synthetic: list[Path], tmp_path: Path) -> None:
    figure = tmp_path / "gsnr.png"
    done = run_cli("plot", "gsnr", *synthetic, "-o", figure)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{figure}\n"  # the figure written: the one line on stdout
    assert pixel_size(figure) == (1000, 400)
    done = run_cli("plot", "osgr", synthetic[0], "-o", tmp_path / "missing" / "osgr.png")
    assert done.returncode == 2
    assert "does not exist" in one_error_line(done.stderr)


def test_acts_attrs_are_what_layer_label_reads(recorded: list[StoreReader]) -> None:
    attrs = dict(recorded[0].lazy(schema.ACTS.bits("1")).attrs)
    assert attrs["module_type"] == "ReLU"
    assert attrs["shape"] == [16]
