"""Figures of the analyses (`gentrace plot ...`): matplotlib, imported only when a figure is drawn.

Figures are drawn on the Agg canvas through matplotlib's object API (no pyplot), so plotting from
a notebook never switches the user's backend. Sizes are fixed in inches at 100 dpi, so a figure's
pixel size is known: GSNR_SIZE and OSGR_SIZE times DPI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gentrace.analyses import gsnr, osgr
from gentrace.errors import AnalysisInputError
from gentrace.store.reader import StoreReader

DPI = 100
GSNR_SIZE = (10.0, 4.0)  # inches: two panels side by side
OSGR_SIZE = (5.0, 5.0)


def store_label(reader: StoreReader) -> str:
    """A store's name for a legend: its directory name without `.zarr`."""
    path = reader.path
    return path.stem if path.suffix == ".zarr" else path.name


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def plot_gsnr(readers: Sequence[StoreReader], out: Path) -> Path:
    """GSNR mean (left, log scale) and same-sign fraction (right) over steps, one line per store.

    Each line is the mean over the store's replicates of `gsnr_mean` and `same_sign` (by=model),
    as in the paper's Figure 2a and 2c (real vs random labels).
    """
    figure = _figure(GSNR_SIZE)
    left, right = figure.subplots(1, 2)
    positive = True
    for reader in readers:
        per_step = gsnr.run(reader).groupby("step")[["gsnr_mean", "same_sign"]].mean()
        steps = per_step.index.to_numpy()
        left.plot(steps, per_step["gsnr_mean"], marker=".", label=store_label(reader))
        right.plot(steps, per_step["same_sign"], marker=".", label=store_label(reader))
        values = per_step["gsnr_mean"].to_numpy()
        positive = positive and bool((values[np.isfinite(values)] > 0).all())
    if positive:
        left.set_yscale("log")
    left.set(xlabel="step", ylabel="mean GSNR over parameters", title="GSNR (eq. 1)")
    right.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    right.set(xlabel="step", ylabel="same-sign fraction", title="p_same_sign (section 3.1)")
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(out)
    return Path(out)


def plot_osgr(readers: Sequence[StoreReader], out: Path) -> Path:
    """Left vs right side of eq. 17, one point per recorded step, one colour per store.

    The title gives the Pearson r over every point (the paper's Figure 1 pools settings the same
    way); with several stores each legend entry gives that store's own r. The dashed line is lhs = rhs.
    """
    figure = _figure(OSGR_SIZE)
    axes = figure.subplots()
    all_lhs: list[np.ndarray] = []
    all_rhs: list[np.ndarray] = []
    for reader in readers:
        per_step = osgr.run(reader)
        keep = np.isfinite(per_step["osgr_lhs"]) & np.isfinite(per_step["osgr_rhs"])
        x, y = per_step["osgr_rhs"][keep].to_numpy(), per_step["osgr_lhs"][keep].to_numpy()
        label = store_label(reader) if len(readers) == 1 else f"{store_label(reader)} (r = {osgr.pearson(x, y):.2f})"
        axes.scatter(x, y, s=12, label=label)
        all_rhs.append(x)
        all_lhs.append(y)
    x, y = np.concatenate(all_rhs), np.concatenate(all_lhs)
    if not x.size:
        raise AnalysisInputError("osgr: no step has both sides of eq. 17 finite; nothing to plot")
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="lhs = rhs")
    axes.set(
        xlabel="osgr_rhs: 1 - sum rho^2 / (n sum E k^2)  (eq. 17, 22)",
        ylabel="osgr_lhs: test / train loss decrease  (eq. 21)",
        title=f"OSGR, Pearson r = {osgr.pearson(x, y):.3f}",
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(out)
    return Path(out)
