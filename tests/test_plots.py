"""gentrace.reporting.plots and `gentrace plot`: the PNG opens and has the documented pixel size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line, run_cli
from matplotlib.image import imread
from reference import random_grads, write_store

from gentrace.reporting import plots
from gentrace.store.reader import StoreReader


def pixel_size(path: Path) -> tuple[int, int]:
    height, width = imread(path).shape[:2]
    return width, height


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
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


def test_plot_gsnr(stores: list[Path], tmp_path: Path) -> None:
    out = plots.plot_gsnr([StoreReader(s) for s in stores], tmp_path / "gsnr.png")
    expected = (round(plots.GSNR_SIZE[0] * plots.DPI), round(plots.GSNR_SIZE[1] * plots.DPI))
    assert pixel_size(out) == expected == (1000, 400)


def test_plot_osgr(stores: list[Path], tmp_path: Path) -> None:
    out = plots.plot_osgr([StoreReader(stores[0])], tmp_path / "osgr.png")
    assert pixel_size(out) == (500, 500)
    several = plots.plot_osgr([StoreReader(s) for s in stores], tmp_path / "both.png")
    assert pixel_size(several) == (500, 500)


def test_store_label(stores: list[Path]) -> None:
    assert plots.store_label(StoreReader(stores[0])) == "real"


def test_cli(stores: list[Path], tmp_path: Path) -> None:
    figure = tmp_path / "gsnr.png"
    done = run_cli("plot", "gsnr", *stores, "-o", figure)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{figure}\n"  # the figure written: the one line on stdout
    assert pixel_size(figure) == (1000, 400)
    done = run_cli("plot", "osgr", stores[0], "-o", tmp_path / "missing" / "osgr.png")
    assert done.returncode == 2
    assert "does not exist" in one_error_line(done.stderr)
