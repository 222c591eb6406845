"""`plot trajectory` and `plot lipschitz`: PNGs of the expected pixel size, one curve per store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from gentrace.core import config
from gentrace.reporting import plots
from gentrace.store.reader import StoreReader
from gentrace.training import run

TINY = [
    "data.name='cos2d'",
    "data.dim=10",
    "data.n_train=30",
    "data.n_test=20",
    "model.hidden=[16, 16]",
    "train.epochs=3",
    "train.batch_size=5",
    "record.grad_moments.every_epochs=0",
    "record.activations.every_epochs=0",
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("bth")
    return [
        run.record(config.load(None, [*TINY, f"data.freq={f}"]), root / f"f{f}.zarr", device="cpu") for f in (0.5, 1.0)
    ]


@pytest.mark.parametrize("kind", ["trajectory", "lipschitz"])
def test_plot_writes_a_png_of_the_documented_size(stores: list[Path], tmp_path: Path, kind: str) -> None:
    out = tmp_path / f"{kind}.png"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gentrace", "plot", kind, *map(str, stores), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n"  # the figure written: the one line on stdout
    image = imread(out)
    assert image.shape[:2] == (int(plots.CURVES_SIZE[1] * plots.DPI), int(plots.CURVES_SIZE[0] * plots.DPI))


def test_plot_functions_accept_readers(stores: list[Path], tmp_path: Path) -> None:
    readers = [StoreReader(p) for p in stores]
    assert plots.plot_trajectory(readers, tmp_path / "t.png").stat().st_size > 1000
