"""Replication on the embedded digits (Nakkiran et al. 2019, section 3 task i: 0-4 vs 5-9), with margins.

- Figure 4: I(F_t;Y) starts near 0 and rises through I(L;Y) of the best linear classifier (T0 exists).
- Claim 1: before T0, mu(F_t;L) is the bulk of I(F_t;Y); the share falls after T0 (Claim 2's plateau).
- Section 3: at T0, mu(F_T0;L)/I(F_T0;Y) of the linear reference exceeds that of the null model with
  the same I(L;Y) (paper: 0.80 vs 0.31 on CIFAR first 5 vs last 5).
Predictions are per epoch only (record.predictions.every_epochs), so "early" means the epochs up to T0.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from gentrace.analyses import mi
from gentrace.core import config
from gentrace.store.reader import StoreReader
from gentrace.training import run

SAMPLES = Path(__file__).resolve().parents[1] / "sample_configs"


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    cfg = config.load(SAMPLES / "mi-digits-binary.toml")
    path = run.record(cfg, tmp_path_factory.mktemp("mi") / "digits.zarr", device="cpu")
    reader = StoreReader(path)
    return mi.run(reader), mi.run(reader, summary=True)


def test_information_rises_through_the_linear_reference(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    df, summary = tables
    mi_ly = float(df.mi_ly.iloc[0])
    assert 0.3 < mi_ly < 0.8  # logistic regression on digits 0-4 vs 5-9 is good, not perfect
    assert df.mi_fy.iloc[0] < 0.05
    assert summary.t0_step[0] > 0
    assert df.mi_fy.tail(5).mean() > mi_ly + 0.1


def test_mu_is_most_of_the_information_early_and_less_later(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    df, summary = tables
    share = df.mu / df.mi_fy
    t0 = int(summary.t0_step[0])
    early = share[(df.step > 0) & (df.step <= t0) & (df.mi_fy > 0.05)]
    late = share.tail(10)
    assert len(early) >= 2
    assert early.mean() > 0.7
    assert early.mean() > late.mean() + 0.05


def test_linear_reference_explains_more_than_the_null_model(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    _, summary = tables
    assert summary.ratio[0] > summary.ratio_null[0] + 0.08
