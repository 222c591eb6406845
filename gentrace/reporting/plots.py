"""Figures of the analyses (`gentrace plot ...`): matplotlib, imported only when a figure is drawn.

Figures are drawn on the Agg canvas through matplotlib's object API (no pyplot), so plotting from
a notebook never switches the user's backend. Sizes are fixed in inches at 100 dpi, so a figure's
pixel size is known: GSNR_SIZE, OSGR_SIZE, OSGR_SWEEP_SIZE, PATHS_SIZE and MI_SIZE times DPI.

Every figure explains itself: a legend names a store by the config values that tell it apart from
the others (`n_train=50, hidden=[32]`, `run_label`), a layer by its call site, module type and
shape (`4 ReLU 16x4x4`, `layer_label`), and step and epoch axes have integer ticks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gentrace.analyses import gsnr, lipschitz, mi, osgr, paths, trajectory
from gentrace.core import varying
from gentrace.core.errors import AnalysisInputError, StoreError
from gentrace.store import schema
from gentrace.store.reader import StoreReader

if TYPE_CHECKING:
    import pandas as pd

DPI = 100
GSNR_SIZE = (10.0, 4.0)  # inches: two panels side by side
OSGR_SIZE = (6.0, 5.0)  # inches: one store, the colour bar of the steps on the right
OSGR_SWEEP_SIZE = (17.0, 4.8)  # inches: up to OSGR_PANELS steps side by side, the legend of the stores on the right
OSGR_PANELS = 4  # the paper's Figure 1 shows four epochs
PATHS_SIZE = (16.0, 8.0)  # inches: cross and self on top; rank changes and three bases' neighbours below
MI_SIZE = (7.0, 4.5)
CURVES_SIZE = (10.0, 4.0)  # inches: two panels side by side (trajectory, lipschitz)
RANK_BASES = (5, 10, 15)  # the base images of the paper's Figure 6
HIGHLIGHTED = 3  # neighbours followed per base in the rank panels: more lines are unreadable
LABEL_KEYS = 3  # legends name stores by at most this many swept config keys, else by their directory names
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def run_labels(readers: Sequence[StoreReader]) -> list[str]:
    """Legend names of the stores: the config values that differ between them, e.g. `n_train=500`.

    The stores' directory names (`store_label`) for one store, and for stores that are not points of
    one sweep: no config key differs, or more than LABEL_KEYS do (a legend line per config).
    """
    trees = [reader.config for reader in readers]
    keys = varying.varying_keys(trees)
    if len(readers) < 2 or not keys or len(keys) > LABEL_KEYS:
        return [store_label(reader) for reader in readers]
    labels = varying.labels(trees, keys)
    if len(set(labels)) < len(labels):
        return [store_label(reader) for reader in readers]
    return labels


def layer_label(reader: StoreReader, layer: str) -> str:
    """A call site with its module type and one sample's shape there, e.g. `4 ReLU 16x4x4`.

    From the attrs `record.activations` stores on `acts/<layer>/bits` (module_type, shape); the bare
    call-site name for a store written before they were stored.
    """
    try:
        attrs: dict[str, Any] = dict(reader.lazy(schema.ACTS.bits(layer)).attrs)
    except StoreError:  # no such acts array: the name is all there is
        return layer
    kind, shape = attrs.get("module_type"), attrs.get("shape")
    dims = "x".join(str(int(s)) for s in shape) if isinstance(shape, list) else ""
    parts = [layer, str(kind) if kind else "", dims]
    return " ".join(part for part in parts if part)


def integer_ticks(axes: Any) -> None:
    """Integer ticks on an x axis of steps or epochs (no `2.5` epochs)."""
    axes.xaxis.set_major_locator(_integer_locator())


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


def gsnr_figure(readers: Sequence[StoreReader]) -> Any:
    """GSNR mean (left, log scale) and same-sign fraction (right) over steps, one line per store.

    Each line is the mean over the store's replicates of `gsnr_mean` and `same_sign` (by=model),
    as in the paper's Figure 2a and 2c (real vs random labels); legends name the swept values.
    """
    figure = _figure(GSNR_SIZE)
    left, right = figure.subplots(1, 2)
    positive = True
    for reader, label in zip(readers, run_labels(readers), strict=True):
        per_step = gsnr.run(reader).groupby("step")[["gsnr_mean", "same_sign"]].mean()
        steps = per_step.index.to_numpy()
        left.plot(steps, per_step["gsnr_mean"], marker=".", label=label)
        right.plot(steps, per_step["same_sign"], marker=".", label=label)
        values = per_step["gsnr_mean"].to_numpy()
        positive = positive and bool((values[np.isfinite(values)] > 0).all())
    if positive:
        left.set_yscale("log")
    left.set(xlabel="step", ylabel="mean GSNR over parameters", title="GSNR (eq. 1)")
    right.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="0.5 (random signs)")
    right.set(xlabel="step", ylabel="same-sign fraction", title="p_same_sign (section 3.1)")
    for axes in (left, right):
        integer_ticks(axes)
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


OSGR_X = "osgr_rhs: 1 - sum rho^2 / (n sum E k^2)  (eq. 17, 22)"
OSGR_Y = "osgr_lhs: test / train loss decrease  (eq. 21)"
OSGR_X_SHORT = "osgr_rhs: 1 - sum rho^2 / (n sum E k^2)\n(eq. 17, 22)"


def osgr_figure(readers: Sequence[StoreReader], step: int | None = None) -> Any:
    """Left vs right side of eq. 17 (GSNR paper, section 3.1 and Figure 1).

    One store: one point per recorded step, coloured by step (a colour bar), no correlation in the
    title: the paper correlates settings at one step, not the steps of one run (`step` draws that
    step alone). Several stores or a sweep directory: `plot_osgr_across`.
    """
    if len(readers) > 1:
        return osgr_across_figure(readers, step)
    (reader,) = readers
    per_step = osgr.run(reader, step=step)
    keep = np.isfinite(per_step["osgr_lhs"]) & np.isfinite(per_step["osgr_rhs"])
    shown = per_step[keep]
    if shown.empty:
        raise AnalysisInputError(f"osgr: {reader.path} has no step with both sides of eq. 17 finite; nothing to plot")
    x, y = shown["osgr_rhs"].to_numpy(), shown["osgr_lhs"].to_numpy()
    figure = _figure(OSGR_SIZE)
    axes = figure.subplots()
    points = axes.scatter(x, y, c=shown["step"].to_numpy(), cmap="viridis", s=16, label="recorded step")
    bar = figure.colorbar(points, ax=axes)
    bar.set_label("step")
    bar.locator = _integer_locator()
    bar.update_ticks()
    _identity(axes, x, y)
    axes.set(xlabel=OSGR_X, ylabel=OSGR_Y, title=f"OSGR per recorded step of one run\n{store_label(reader)}")
    axes.legend(fontsize="small", title="compare settings: plot a sweep", title_fontsize="small")
    figure.tight_layout()
    return figure


def osgr_across_figure(readers: Sequence[StoreReader], step: int | None = None) -> Any:
    """The paper's Figure 1: one point per store (setting) at each of up to four steps, the Pearson r per step.

    Panel titles give the step and the r across the stores there (`osgr.at_step`; no r below three
    points). The first config key that differs between the stores picks the colour, the second the
    marker (the paper: colour = training-set size, symbol = channels); the legend names each store
    by its swept values. Steps: `step`, else up to OSGR_PANELS evenly spread over the steps every
    store has (the first included: eq. 17 holds best early in training).
    """
    per_step = [osgr.run(reader) for reader in readers]
    common = osgr.common_steps(per_step)
    if step is not None:
        steps = [step]
    elif common:
        picks = np.unique(np.linspace(0, len(common) - 1, min(OSGR_PANELS, len(common))).round().astype(int))
        steps = [common[i] for i in picks]
    else:
        osgr.at_step(per_step, None, [str(r.path) for r in readers])  # raises: no common step
        steps = []
    trees = [reader.config for reader in readers]
    keys = varying.varying_keys(trees)
    colour_of = _styles(trees, keys[0] if keys else None, len(readers))
    marker_of = _styles(trees, keys[1] if len(keys) > 1 else None, 1)
    labels = run_labels(readers)
    figure = _figure(OSGR_SWEEP_SIZE)
    panels = np.atleast_1d(figure.subplots(1, len(steps), squeeze=False)[0])
    for axes, t in zip(panels, steps, strict=True):
        table = osgr.at_step(per_step, t, [str(r.path) for r in readers])
        for i, row in table.iterrows():
            axes.scatter(
                row["osgr_rhs"],
                row["osgr_lhs"],
                color=f"C{colour_of[int(i)] % 10}",  # type: ignore[call-overload]
                marker=MARKERS[marker_of[int(i)] % len(MARKERS)],  # type: ignore[call-overload]
                s=36,
                label=labels[int(i)],  # type: ignore[call-overload]
            )
        _identity(axes, table["osgr_rhs"].to_numpy(), table["osgr_lhs"].to_numpy())
        count = int(table["n_points"].iloc[0])
        r = float(table["pearson_r_across"].iloc[0])
        said = f"Pearson r = {r:.3f} across {count} stores" if count >= 3 and np.isfinite(r) else f"{count} stores"
        epoch = int(table["epoch"].iloc[0])
        axes.set(xlabel=OSGR_X_SHORT, ylabel=OSGR_Y, title=f"step {t} (epoch {epoch})\n{said}")
    handles, names = panels[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="center right", fontsize="small", title="store", title_fontsize="small")
    figure.suptitle("OSGR across settings (GSNR paper, Figure 1): one point per store at each step")
    figure.tight_layout(rect=(0.0, 0.0, 0.86, 1.0))
    return figure


def _styles(trees: Sequence[Any], key: str | None, count: int) -> list[int]:
    """Per store, the index of its value of `key` among the distinct values (0 for all without a key)."""
    if key is None:
        return list(range(count)) if count > 1 else [0] * len(trees)
    values = [varying.text(varying.flatten(tree).get(key)) for tree in trees]
    distinct = list(dict.fromkeys(values))
    return [distinct.index(value) for value in values]


def _identity(axes: Any, x: np.ndarray, y: np.ndarray) -> None:
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="lhs = rhs")


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def mi_figure(readers: Sequence[StoreReader], reference: str = "linear") -> Any:
    """I(F_t;Y) and mu_Y(F_t;L) over steps, I(L;Y) as a horizontal line (increasing-complexity paper, Figure 4).

    One pair of lines per store (replicate 0 when a run has several), the test accuracy on a right
    axis, and T0 (the first step with I(F_t;Y) >= I(L;Y)) marked by a labelled dotted vertical line.
    """
    figure = _figure(MI_SIZE)
    axes = figure.subplots()
    right = axes.twinx()
    for reader, name in zip(readers, run_labels(readers), strict=True):
        df = mi.run(reader, reference=reference)
        if "replicate" in df:
            df = df[df["replicate"] == 0]
        prefix = f"{name}: " if len(readers) > 1 else ""
        (line,) = axes.plot(df["step"], df["mi_fy"], marker=".", label=f"{prefix}I(F_t;Y)")
        axes.plot(df["step"], df["mu"], marker=".", linestyle="--", color=line.get_color(), label=f"{prefix}mu(F_t;L)")
        mi_ly = float(df["mi_ly"].iloc[0])
        axes.axhline(mi_ly, color=line.get_color(), linestyle=":", linewidth=1, label=f"{prefix}I(L;Y) ({reference})")
        t0 = mi.first_reaching(df["mi_fy"].to_numpy(), mi_ly)
        if t0 is not None:
            at = int(df["step"].iloc[t0])
            axes.axvline(at, color=line.get_color(), linestyle="-.", linewidth=1, label=f"{prefix}T0 = step {at}")
        right.plot(df["step"], df["acc"], color=line.get_color(), alpha=0.3, linewidth=1)
    axes.set(
        xlabel="SGD step",
        ylabel="bits",
        title=f"mutual information, reference {reference} (Fig. 4); T0: I(F_t;Y) first reaches I(L;Y)",
    )
    axes.title.set_fontsize("medium")
    right.set_ylabel("test accuracy (faint)")
    integer_ticks(axes)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def paths_figure(
    readers: Sequence[StoreReader],
    layer: str | None = None,
    bases: Sequence[int] | None = None,
    device: str | None = None,
) -> Any:
    """ReLU path similarity over epochs (image-functions paper, Figures 1-3, 5 and 6).

    Top: cross similarity (left, section 6.1) and self similarity (right, section 7.1), one line per
    store and layer (named `4 ReLU 16x4x4`): the median over pairs (samples) with the 10%-90% band
    shaded. Bottom, in `layer` of the first store (default: the second ReLU call site, the paper's
    "layer 2", or the only one), for three base samples (5, 10, 15 as in Figure 6, or the first three
    probes): left, how many probes entered or left each base's nearest 6 since the previous epoch
    (section 8: the neighbours settle); then per base the rank of its HIGHLIGHTED nearest probes at the
    last epoch, followed back over the epochs (rank 0 = nearest; `6+` = not among the nearest 6).
    """
    figure = _figure(PATHS_SIZE)
    grid = figure.add_gridspec(2, 4)
    top = {"cross": figure.add_subplot(grid[0, :2]), "self": figure.add_subplot(grid[0, 2:])}
    for reader, run_name in zip(readers, run_labels(readers), strict=True):
        for kind, axes in top.items():
            df = paths.run(reader, kind=kind, device=device)  # type: ignore[arg-type]
            for name, part in df[df["n"] > 0].groupby("layer", sort=False):
                shown = layer_label(reader, str(name))
                label = f"{run_name}: {shown}" if len(readers) > 1 else shown
                (line,) = axes.plot(part["epoch"], part["q50"], marker=".", label=label)
                axes.fill_between(part["epoch"], part["q10"], part["q90"], color=line.get_color(), alpha=0.15)
    top["cross"].set(
        xlabel="epoch t",
        ylabel="(p_i^t*p_j^t).(p_i^s*p_j^s) / norms",
        title="cross path similarity vs previous epoch (section 6.1): median, 10-90% band",
    )
    top["self"].set(
        xlabel="epoch t", ylabel="p_i^t . p_i^s / norms", title="self similarity (section 7.1): median, 10-90% band"
    )
    for axes in top.values():
        axes.set_ylim(top=1.01)
        integer_ticks(axes)
        axes.legend(fontsize=7, ncol=2, title="layer: call site, module, shape", title_fontsize=7)
    first = readers[0]
    names = paths.layers_of(first)
    chosen = paths.layers_of(first, layer)[0] if layer is not None else names[min(1, len(names) - 1)]
    probes = int(first.lazy(schema.ACTS.bits(chosen)).shape[1])
    if bases is None:
        bases = list(RANK_BASES) if probes > max(RANK_BASES) else list(range(min(3, probes)))
    bases = [int(b) for b in bases[:3]]
    shown = layer_label(first, chosen)
    summary = paths.run(first, layer=chosen, kind="rank", bases=bases, device=device)
    ranks = paths.run(first, layer=chosen, kind="rank", pairs=True, bases=bases, device=device)
    changes = figure.add_subplot(grid[1, 0])
    for k, base in enumerate(bases):
        part = summary[summary["base"] == base].iloc[1:]  # the first epoch has no previous one
        changes.plot(part["epoch"], part["sym_diff"], marker=".", color=f"C{k}", label=f"base {base}")
    changes.set(
        xlabel="epoch",
        ylabel=f"probes in + out of the nearest {paths.NEAREST}",
        title=f"nearest-{paths.NEAREST} set changes per epoch\n{shown}",
    )
    changes.set_ylim(bottom=-0.3)
    integer_ticks(changes)
    changes.legend(fontsize=7, title="base probe", title_fontsize=7)
    for k, base in enumerate(bases):
        _rank_panel(figure.add_subplot(grid[1, k + 1]), ranks[ranks["base"] == base], base, shown, f"C{k}")
    figure.tight_layout()
    return figure


def _rank_panel(axes: Any, ranks: Any, base: int, layer: str, colour: str) -> None:
    """Rank over epochs of the base's HIGHLIGHTED nearest probes at the last epoch (section 8, Figure 6)."""
    k = paths.NEAREST
    epochs = np.sort(ranks["epoch"].unique())
    last = ranks[ranks["epoch"] == epochs[-1]].sort_values("rank") if len(epochs) else ranks
    styles = ("-", "--", ":")
    for j, other in enumerate(last["other"].head(HIGHLIGHTED)):
        mine = ranks[ranks["other"] == other].set_index("epoch")["rank"]
        series = mine.reindex(epochs).to_numpy(dtype=np.float64, copy=True)  # NaN where not ranked (empty path)
        series = np.minimum(series, k)  # beyond the nearest k: drawn on the `k+` line
        axes.plot(epochs, series, marker=".", color=colour, linestyle=styles[j % 3], label=f"probe {int(other)}")
    axes.set_ylim(k + 0.5, -0.5)
    axes.set_yticks(range(k + 1), [*map(str, range(k)), f"{k}+"])
    axes.set(
        xlabel="epoch",
        ylabel="rank by overlap (0 = nearest)",
        title=f"base {base}: rank of its final {HIGHLIGHTED} nearest\n{layer}",
    )
    integer_ticks(axes)
    axes.legend(fontsize=7, title=f"nearest at epoch {int(epochs[-1]) if len(epochs) else 0}", title_fontsize=7)


def _curves(
    readers: Sequence[StoreReader],
    series: Callable[[StoreReader], Sequence[Any]],
    panels: Sequence[tuple[str, str]],
    marker: str | None = None,
) -> Any:
    """One panel per (ylabel, title) of `panels` over steps, one line per store: `series(reader)[k]` in panel k.

    A panel's entry may be a mapping name -> series: one line per name (linestyles differ), labelled
    `store: name`. Stores are named by their swept config values (`run_labels`).
    """
    figure = _figure(CURVES_SIZE if len(panels) == 2 else (5.0 * len(panels), 4.0))
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    styles = ("-", "--", ":", "-.")
    for k, (reader, label) in enumerate(zip(readers, run_labels(readers), strict=True)):
        for ax, values in zip(axes, series(reader), strict=True):
            named = values if isinstance(values, Mapping) else {"": values}
            for j, (name, line) in enumerate(named.items()):
                text = (f"{label}: {name}" if len(readers) > 1 else name) if name else label
                ax.plot(
                    line.index.to_numpy(),
                    line.to_numpy(),
                    marker=marker,
                    color=f"C{k % 10}",
                    linestyle=styles[j % len(styles)],
                    label=text,
                )
    for ax, (ylabel, title) in zip(axes, panels, strict=True):
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        integer_ticks(ax)
    for ax in axes:
        handles, _ = ax.get_legend_handles_labels()
        if ax is axes[0] or len(handles) > len(readers):
            ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def trajectory_figure(readers: Sequence[StoreReader], param: str | None = None) -> Any:
    """Cumulative trajectory length (left) and distance from initialization (right) over steps (BTH paper).

    One line per store (mean over its replicates), so a sweep over `data.freq` or
    `data.label_noise` shows one curve per swept value; the titles name the tensor followed.
    """

    def series(reader: StoreReader) -> list[pd.Series]:
        per_step = trajectory.run(reader, param, by="step").groupby("step")[["length", "distance_from_init"]].mean()
        return [per_step["length"], per_step["distance_from_init"]]

    tensors = list(dict.fromkeys(trajectory.choose_tensor(reader, param)[1] for reader in readers))
    tensor = ", ".join(tensors)
    panels = [
        ("trajectory length", f"cumulative length of {tensor}"),
        (f"||b_t - b_0||, b = {tensor}", f"{tensor}: distance from initialization"),
    ]
    return _curves(readers, series, panels)


def lipschitz_figure(readers: Sequence[StoreReader], device: str | None = None) -> Any:
    """Median local Lipschitz constant at training points (left) and far from the data (right) per snapshot.

    One line per store (mean over its replicates), BTH paper section 3. Right: each far set of `analyze
    lipschitz` on its own line: far-gaussian (the training inputs' Gaussian fit, 3x its spread) solid,
    far-midpoint (midpoints of training pairs) dashed.
    """
    far_sets = lipschitz.GROUPS["far"]

    def series(reader: StoreReader) -> list[Any]:
        frame = lipschitz.run(reader, where=("train", "far"), quantiles=(0.5,), device=device)
        near = frame[frame["where"] == "train"].groupby("step")["q50"].mean()
        far = {name: frame[frame["where"] == name].groupby("step")["q50"].mean() for name in far_sets}
        return [near, far]

    scale = f"{lipschitz.FAR_SCALE:g}"
    panels = [
        ("median ||df/dx||", "local Lipschitz constant at training points"),
        ("median ||df/dx||", f"far: Gaussian fit x{scale} (solid), midpoints of pairs (dashed)"),
    ]
    return _curves(readers, series, panels, marker=".")


def columns_figure(
    readers: Sequence[StoreReader],
    table: Callable[[StoreReader], pd.DataFrame],
    columns: Sequence[str],
    name: str,
) -> Any:
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

    return _curves(readers, series, [(column, f"{name}: {column}") for column in columns], marker=".")


# -- `gentrace plot NAME`: draw, then write the file ------------------------------------------------------
def save(figure: Any, out: Path) -> Path:
    """Write a figure to `out` (the extension picks the format) and return the path."""
    figure.savefig(out)
    return Path(out)


def plot_gsnr(readers: Sequence[StoreReader], out: Path) -> Path:
    """`gsnr_figure` written to `out`."""
    return save(gsnr_figure(readers), out)


def plot_osgr(readers: Sequence[StoreReader], out: Path, step: int | None = None) -> Path:
    """`osgr_figure` (one store) or `osgr_across_figure` (several, a sweep) written to `out`."""
    return save(osgr_figure(readers, step), out)


def plot_mi(readers: Sequence[StoreReader], out: Path, reference: str = "linear") -> Path:
    """`mi_figure` written to `out`."""
    return save(mi_figure(readers, reference), out)


def plot_paths(
    readers: Sequence[StoreReader],
    out: Path,
    layer: str | None = None,
    bases: Sequence[int] | None = None,
    device: str | None = None,
) -> Path:
    """`paths_figure` written to `out`."""
    return save(paths_figure(readers, layer, bases, device), out)


def plot_trajectory(readers: Sequence[StoreReader], out: Path, param: str | None = None) -> Path:
    """`trajectory_figure` written to `out`."""
    return save(trajectory_figure(readers, param), out)


def plot_lipschitz(readers: Sequence[StoreReader], out: Path, device: str | None = None) -> Path:
    """`lipschitz_figure` written to `out`."""
    return save(lipschitz_figure(readers, device), out)


def plot_columns(
    readers: Sequence[StoreReader],
    out: Path,
    table: Callable[[StoreReader], pd.DataFrame],
    columns: Sequence[str],
    name: str,
) -> Path:
    """`columns_figure` written to `out`."""
    return save(columns_figure(readers, table, columns, name), out)
