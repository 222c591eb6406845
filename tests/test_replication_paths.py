"""Replication on the embedded digits (image-functions paper): a cut-down CNN run, assertions with margin.

- Section 4.1 / figure 4: self similarity of a sample's path between consecutive epochs is below 1
  early in training and rises towards 1 later.
- Section 4.3 / figure 6: the identity of a base sample's nearest 6 neighbours (by path overlap)
  changes over training.
- Section 4.2: the early/mid cross-path similarity ratio (before/after the first lr decay) is finite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gentrace.analyses import paths
from gentrace.core import config
from gentrace.store.reader import StoreReader
from gentrace.training import run

SAMPLES = Path(__file__).resolve().parents[1] / "sample_configs"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> StoreReader:
    cfg = config.load(
        SAMPLES / "paths-digits-cnn.toml",
        [
            "data.n_train=400",
            "train.epochs=12",
            "train.lr_decay={every_epochs=6, factor=0.1}",
            "record.activations={every_epochs=1, probe=64}",
            "record.params={every_epochs=6}",
            "record.predictions={every_epochs=0}",
        ],
    )
    return StoreReader(run.record(cfg, tmp_path_factory.mktemp("paths") / "s.zarr", device="cpu"))


def test_self_similarity_below_one_early_and_rising(store: StoreReader) -> None:
    frame = paths.run(store, kind="self")
    for layer, rows in frame.groupby("layer"):
        rows = rows.sort_values("epoch")
        early, late = rows["mean"].iloc[0], rows["mean"].iloc[-1]
        assert early < 0.95, (layer, early)
        assert late > early + 0.03, (layer, early, late)


def test_nearest_neighbours_change_over_training(store: StoreReader) -> None:
    frame = paths.run(store, kind="rank")
    last = frame[frame.epoch == frame.epoch.max()]
    assert (last.changes > 0).mean() > 0.9  # nearly every base sample saw its nearest 6 change
    assert last.changes.mean() >= 2


def test_early_mid_cross_ratio_is_finite(store: StoreReader) -> None:
    frame: pd.DataFrame = paths.run(store, kind="ratio")
    assert len(frame) == len(store.act_layers())
    assert np.isfinite(frame.ratio).all()
    assert (frame.ratio > 0).all()
