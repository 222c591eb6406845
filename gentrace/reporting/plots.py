"""Figures of the analyses (`gentrace plot ...`): matplotlib, imported only when a figure is drawn.

Figures are drawn on the Agg canvas through matplotlib's object API (no pyplot), so plotting from
a notebook never switches the user's backend. Sizes are fixed in inches at 100 dpi, so a figure's
pixel size is known: GSNR_SIZE, OSGR_SIZE, PATHS_SIZE and MI_SIZE times DPI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gentrace.analyses import gsnr, lipschitz, mi, osgr, paths, trajectory
from gentrace.core.errors import AnalysisInputError
from gentrace.store import schema
from gentrace.store.reader import StoreReader

if TYPE_CHECKING:
    import pandas as pd

DPI = 100
GSNR_SIZE = (10.0, 4.0)  # inches: two panels side by side
OSGR_SIZE = (5.0, 5.0)
PATHS_SIZE = (15.0, 8.0)  # inches: cross and self on top, three rank panels below
MI_SIZE = (7.0, 4.5)
CURVES_SIZE = (10.0, 4.0)  # inches: two panels side by side (trajectory, lipschitz)
RANK_BASES = (5, 10, 15)  # the base images of the paper's Figure 6


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


def plot_mi(readers: Sequence[StoreReader], out: Path, reference: str = "linear") -> Path:
    """I(F_t;Y) and mu_Y(F_t;L) over steps, I(L;Y) as a horizontal line (increasing-complexity paper, Figure 4).

    One pair of lines per store (replicate 0 when a run has several), the test accuracy on a right
    axis, and T0 (the first step with I(F_t;Y) >= I(L;Y)) marked by a dotted vertical line.
    """
    figure = _figure(MI_SIZE)
    axes = figure.subplots()
    right = axes.twinx()
    for reader in readers:
        df = mi.run(reader, reference=reference)
        if "replicate" in df:
            df = df[df["replicate"] == 0]
        name = store_label(reader)
        prefix = f"{name}: " if len(readers) > 1 else ""
        (line,) = axes.plot(df["step"], df["mi_fy"], marker=".", label=f"{prefix}I(F_t;Y)")
        axes.plot(df["step"], df["mu"], marker=".", linestyle="--", color=line.get_color(), label=f"{prefix}mu(F_t;L)")
        mi_ly = float(df["mi_ly"].iloc[0])
        axes.axhline(mi_ly, color=line.get_color(), linestyle=":", linewidth=1, label=f"{prefix}I(L;Y) ({reference})")
        t0 = mi.first_reaching(df["mi_fy"].to_numpy(), mi_ly)
        if t0 is not None:
            axes.axvline(float(df["step"].iloc[t0]), color="grey", linestyle=":", linewidth=1)
        right.plot(df["step"], df["acc"], color=line.get_color(), alpha=0.3, linewidth=1)
    axes.set(xlabel="SGD step", ylabel="bits", title=f"mutual information, reference {reference} (Fig. 4)")
    right.set_ylabel("test accuracy (faint)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out)
    return Path(out)


def plot_paths(
    readers: Sequence[StoreReader],
    out: Path,
    layer: str | None = None,
    bases: Sequence[int] | None = None,
    device: str | None = None,
) -> Path:
    """ReLU path similarity over epochs (image-functions paper, Figures 1-3, 5 and 6).

    Top: cross similarity (left, section 6.1) and self similarity (right, section 7.1), one line per
    store and layer: the median over pairs (samples) with the 10%-90% band shaded. Bottom: for three
    base samples (5, 10, 15 as in Figure 6, or the first three probes), the rank by overlap of every
    probe while it is among the base's nearest 6 (rank 0 = nearest), in `layer` of the
    first store (default: the second ReLU call site, the paper's "layer 2", or the only one).
    """
    figure = _figure(PATHS_SIZE)
    grid = figure.add_gridspec(2, 6)
    top = {"cross": figure.add_subplot(grid[0, :3]), "self": figure.add_subplot(grid[0, 3:])}
    for reader in readers:
        for kind, axes in top.items():
            df = paths.run(reader, kind=kind, device=device)  # type: ignore[arg-type]
            for name, part in df[df["n"] > 0].groupby("layer", sort=False):
                label = f"{store_label(reader)}: {name}" if len(readers) > 1 else str(name)
                (line,) = axes.plot(part["epoch"], part["q50"], marker=".", label=label)
                axes.fill_between(part["epoch"], part["q10"], part["q90"], color=line.get_color(), alpha=0.15)
    top["cross"].set(
        xlabel="epoch t", ylabel="(p_i^t*p_j^t).(p_i^s*p_j^s) / norms", title="cross path similarity (section 6.1)"
    )
    top["self"].set(xlabel="epoch t", ylabel="p_i^t . p_i^s / norms", title="self similarity (section 7.1)")
    for axes in top.values():
        axes.set_ylim(top=1.01)
        axes.legend(fontsize=7, ncol=2, title="layer", title_fontsize=7)
    first = readers[0]
    names = paths.layers_of(first)
    chosen = paths.layers_of(first, layer)[0] if layer is not None else names[min(1, len(names) - 1)]
    probes = int(first.lazy(schema.ACTS.bits(chosen)).shape[1])
    if bases is None:
        bases = list(RANK_BASES) if probes > max(RANK_BASES) else list(range(min(3, probes)))
    ranks = paths.run(first, layer=chosen, kind="rank", pairs=True, bases=bases, device=device)
    for k, base in enumerate(bases[:3]):
        axes = figure.add_subplot(grid[1, 2 * k : 2 * k + 2])
        _rank_panel(axes, ranks[ranks["base"] == base], int(base), chosen)
    figure.tight_layout()
    figure.savefig(out)
    return Path(out)


def _rank_panel(axes: Any, ranks: Any, base: int, layer: str) -> None:
    """Rank over epochs of every probe that is among the base's nearest neighbours at some epoch."""
    k = paths.NEAREST
    epochs = np.sort(ranks["epoch"].unique())
    near = ranks[ranks["rank"] < k]
    for other in sorted(near["other"].unique()):
        mine = ranks[ranks["other"] == other].set_index("epoch")["rank"]
        series = mine.reindex(epochs).to_numpy(dtype=np.float64, copy=True)  # NaN where not ranked (empty path)
        series[series >= k] = np.nan  # the paper restricts the plot to the nearest k
        axes.plot(epochs, series, marker=".", label=str(other))
    axes.set_ylim(k - 0.5, -0.5)
    axes.set(xlabel="epoch", ylabel="rank by overlap (0 = nearest)", title=f"base {base}: nearest {k}, layer {layer}")
    axes.legend(fontsize=6, ncol=2, title="probe", title_fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _curves(
    readers: Sequence[StoreReader],
    out: Path,
    series: Callable[[StoreReader], Sequence[pd.Series]],
    panels: Sequence[tuple[str, str]],
    marker: str | None = None,
) -> Path:
    """One panel per (ylabel, title) of `panels` over steps, one line per store: `series(reader)[k]` in panel k."""
    figure = _figure(CURVES_SIZE if len(panels) == 2 else (5.0 * len(panels), 4.0))
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    for reader in readers:
        for ax, values in zip(axes, series(reader), strict=True):
            ax.plot(values.index.to_numpy(), values.to_numpy(), marker=marker, label=store_label(reader))
    for ax, (ylabel, title) in zip(axes, panels, strict=True):
        ax.set(xlabel="step", ylabel=ylabel, title=title)
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out)
    return out


def plot_trajectory(readers: Sequence[StoreReader], out: Path, param: str | None = None) -> Path:
    """Cumulative trajectory length (left) and distance from initialization (right) over steps (BTH paper).

    One line per store (mean over its replicates), so a sweep over `data.freq` or
    `data.label_noise` shows one curve per swept value.
    """

    def series(reader: StoreReader) -> list[pd.Series]:
        per_step = trajectory.run(reader, param, by="step").groupby("step")[["length", "distance_from_init"]].mean()
        return [per_step["length"], per_step["distance_from_init"]]

    panels = [("trajectory length", "cumulative length of the tracked tensor")]
    return _curves(readers, out, series, [*panels, ("||b_t - b_0||", "distance from initialization")])


def plot_lipschitz(readers: Sequence[StoreReader], out: Path, device: str | None = None) -> Path:
    """Median local Lipschitz constant at training points (left) and far from the data (right) per snapshot.

    One line per store (mean over its replicates), BTH paper section 3; far = the Gaussian and
    midpoint sets of `analyze lipschitz` pooled by their medians.
    """

    def series(reader: StoreReader) -> list[pd.Series]:
        frame = lipschitz.run(reader, where=("train", "far"), quantiles=(0.5,), device=device)
        near = frame[frame["where"] == "train"].groupby("step")["q50"].mean()
        return [near, frame[frame["where"].str.startswith("far")].groupby("step")["q50"].mean()]

    panels = [
        ("median ||df/dx||", "local Lipschitz constant at training points"),
        ("median ||df/dx||", "far from the data"),
    ]
    return _curves(readers, out, series, panels, marker=".")


def plot_columns(
    readers: Sequence[StoreReader],
    out: Path,
    table: Callable[[StoreReader], pd.DataFrame],
    columns: Sequence[str],
    name: str,
) -> Path:
    """The figure of an analysis without a plot of its own: each of `columns` of its table over `step`.

    One panel per column, one line per store: the mean of the column over the table's other rows
    (replicates, layers, ...) at each step.

    Raises:
        AnalysisInputError: the table has no `step` column or lacks one of `columns`.
    """

    def series(reader: StoreReader) -> list[pd.Series]:
        frame = table(reader)
        missing = [c for c in ("step", *columns) if c not in frame.columns]
        if missing:
            raise AnalysisInputError(f"plot {name}: the table of {reader.path} has no column {missing[0]!r}")
        per_step = frame.groupby("step")[list(columns)].mean()
        return [per_step[c] for c in columns]

    return _curves(readers, out, series, [(column, f"{name}: {column}") for column in columns], marker=".")
