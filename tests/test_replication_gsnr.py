"""Replication on the embedded digits (GSNR paper, Liu et al. 2020): cut-down runs, assertions with margin.

- Fig. 2a: the mean GSNR of a model trained on real labels is higher than on random labels.
- Fig. 2c: the same-sign fraction is above one half with real labels (and above the random-label run).
- Fig. 1: across training-set sizes and widths, the two sides of eq. 17 (OSGR measured vs predicted
  from the GSNR) are strongly correlated at a given early step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gentrace.analyses import gsnr, osgr
from gentrace.core import config
from gentrace.store.reader import StoreReader
from gentrace.training import run

SAMPLES = Path(__file__).resolve().parents[1] / "sample_configs"


@pytest.fixture(scope="module")
def real_and_random(tmp_path_factory: pytest.TempPathFactory) -> dict[float, pd.DataFrame]:
    out = {}
    for noise in (0.0, 1.0):
        cfg = config.load(
            SAMPLES / "gsnr-digits.toml",
            [f"data.label_noise={noise}", "train.epochs=12", "record.grad_moments={every_epochs=3}"],
        )
        path = run.record(cfg, tmp_path_factory.mktemp("gsnr") / "s.zarr", device="cpu")
        out[noise] = gsnr.run(StoreReader(path))
    return out


def test_gsnr_is_higher_with_real_labels(real_and_random: dict[float, pd.DataFrame]) -> None:
    real, rand = real_and_random[0.0], real_and_random[1.0]
    assert list(real.step) == list(rand.step)
    assert (real.gsnr_mean.to_numpy() > 1.5 * rand.gsnr_mean.to_numpy()).all()
    assert real.gsnr_mean.mean() > 3 * rand.gsnr_mean.mean()


def test_same_sign_above_one_half_with_real_labels(real_and_random: dict[float, pd.DataFrame]) -> None:
    real, rand = real_and_random[0.0], real_and_random[1.0]
    assert (real.same_sign > 0.55).all()
    assert (real.same_sign.to_numpy() > rand.same_sign.to_numpy() + 0.01).all()


def test_osgr_sides_correlate_across_settings(tmp_path: Path) -> None:
    points = []
    for n_train in (25, 50, 100, 200, 300):
        for width in (64, 256):
            cfg = config.load(
                SAMPLES / "osgr-digits.toml",
                [
                    f"data.n_train={n_train}",
                    "data.n_test=500",
                    f"model.hidden=[{width}]",
                    "train.epochs=1",
                    "record.grad_moments={every_steps=1, every_epochs=0}",
                    "record.params={every_epochs=1}",
                    "record.predictions={every_epochs=0}",
                ],
            )
            path = run.record(cfg, tmp_path / f"{n_train}-{width}.zarr", device="cpu")
            frame = osgr.run(StoreReader(path))
            points.append(frame[frame.step == 0][["osgr_lhs", "osgr_rhs"]].to_numpy()[0])
    lhs, rhs = np.array(points).T
    r = np.corrcoef(lhs, rhs)[0, 1]
    assert r > 0.8, (r, points)
