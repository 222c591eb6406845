"""`gentrace analyze ...` and `gentrace plot ...`: parse -> call an analysis -> write a table or a figure.

Tables go to stdout as CSV unless `--format` or `-o` say otherwise (gentrace.cli.output); figures go to
the `-o` file (gentrace.reporting.plots). The analyses, pandas and matplotlib are imported inside the
commands, so `gentrace --help` and `gentrace record` do not pay for them.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gentrace.cli.errors import user_errors
from gentrace.core.errors import AnalysisInputError, ConfigError
from gentrace.store.reader import StoreReader
from gentrace.training.sweep import over_stores

if TYPE_CHECKING:
    import pandas as pd

analyze_app = typer.Typer(
    help="Compute a diagnostic from a store; CSV on stdout (--format, -o change that).", no_args_is_help=True
)
plot_app = typer.Typer(help="Draw a diagnostic of one or more stores into an image file.", no_args_is_help=True)


class By(StrEnum):
    """Granularity of `analyze gsnr`."""

    model = "model"
    layer = "layer"
    param = "param"


class PathKind(StrEnum):
    """What `analyze paths` computes (SPEC section 5)."""

    overlap = "overlap"
    cross = "cross"
    self_ = "self"
    rank = "rank"
    ratio = "ratio"


class MiReference(StrEnum):
    """Reference classifier L of `analyze mi` (gentrace.analyses.mi_references)."""

    linear = "linear"
    fit_linear = "fit-linear"
    null = "null"
    cnn2 = "cnn2"
    cnn4 = "cnn4"
    cnn6 = "cnn6"


class MiSplit(StrEnum):
    """The split that stands for the population in `analyze mi`."""

    test = "test"
    train = "train"


class Format(StrEnum):
    """Table formats of gentrace.cli.output."""

    csv = "csv"
    tsv = "tsv"
    json = "json"
    parquet = "parquet"
    table = "table"


StoresArg = Annotated[list[Path], typer.Argument(help="Stores written by `gentrace record`.", show_default=False)]
AnalyzeStoresArg = Annotated[
    list[Path],
    typer.Argument(
        help="One or more stores, or sweep directories; with several, rows gain `store` and the differing config keys.",
        show_default=False,
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Table format.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")]
FigureOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Image file; the extension picks the format (.png, .pdf, .svg).")
]
DaskOpt = Annotated[
    str | None,
    typer.Option(
        "--dask",
        help="Run on a dask.distributed cluster: a scheduler address (tcp://host:8786) or 'local'; "
        "needs gentrace[dask]; workers must see the stores at the same paths.",
        show_default=False,
    ),
]


def _writable(out: Path | None, example: str = "out.csv") -> None:
    """`-o FILE` names a file that can be written: checked before the analysis runs."""
    if out is None:
        return
    from gentrace.training.preflight import why_not_writable

    if out.is_dir():
        raise ConfigError(f"-o {out} is a directory; give a file name, e.g. -o {out / example}")
    if not out.parent.is_dir():
        raise ConfigError(f"-o {out}: the directory {out.parent} does not exist")
    why = why_not_writable(out.parent)  # a new file needs its directory writable; an existing one only itself
    denied = os.strerror(errno.EACCES)
    if out.exists() and why in (None, denied):
        why = None if os.access(out, os.W_OK) else denied
    if why is not None:
        raise ConfigError(f"-o {out}: cannot write there ({why}); give another -o")


def _figure_file(out: Path) -> None:
    """`plot -o FIG`: a writable file whose extension matplotlib can write (.png, .pdf, .svg, ...)."""
    _writable(out, "figure.png")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in formats:
        known = ", ".join(f".{f}" for f in sorted(formats))
        raise ConfigError(f"-o {out}: matplotlib cannot write {out.suffix} figures; use one of {known}")


def _device(device: str | None) -> str | None:
    """`--device` of the analyses: auto (None), cpu, cuda, cuda:N; refused before any work when it is not there."""
    from gentrace.analyses.bits import resolve_device

    return None if device in (None, "auto") else resolve_device(device)


def _parse_replicate(value: str) -> int | None:
    if value == "all":
        return None
    if value.isdigit():
        return int(value)
    raise typer.BadParameter(f"give a replicate number (0, 1, ...) or 'all', not {value!r}", param_hint="--replicate")


def _emit(table: pd.DataFrame | Iterable[pd.DataFrame], fmt: Format, out: Path | None) -> None:
    from gentrace.cli import output as report

    _writable(out)
    try:
        report.write(table, fmt.value, out)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, like any Unix filter.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(141) from None


def _emit_on_dask(
    stores: list[Path], make_plan: Callable[[StoreReader, int], Any], address: str, fmt: Format, out: Path | None
) -> None:
    """`--dask ADDRESS`: run each store's plan on the cluster (gentrace.analyses.dask_backend), same table."""
    from gentrace.analyses import dask_backend

    _writable(out)
    with dask_backend.connect(address) as client:
        parts = dask_backend.parts(client)
        _emit(over_stores(stores, lambda reader: dask_backend.frames(make_plan(reader, parts), client)), fmt, out)


@analyze_app.command("gsnr")
@user_errors
def analyze_gsnr(
    stores: AnalyzeStoresArg,
    by: Annotated[
        By, typer.Option(help="model: one row per step and replicate; layer: per tensor; param: per parameter.")
    ] = By.model,
    replicate: Annotated[str, typer.Option(help="A replicate number, or 'all'.")] = "all",
    fmt: FormatOpt = Format.csv,
    out: OutOpt = None,
    dask: DaskOpt = None,
) -> None:
    """GSNR (mean, median), same-sign fraction and zero-variance count per recorded step."""
    from gentrace.analyses import gsnr

    chosen = _parse_replicate(replicate)
    if dask is not None:
        _emit_on_dask(stores, lambda reader, _: gsnr.plan(reader, by.value, chosen), dask, fmt, out)
        return
    _emit(over_stores(stores, lambda reader: gsnr.frames(reader, by.value, chosen)), fmt, out)


@analyze_app.command("osgr")
@user_errors
def analyze_osgr(
    stores: AnalyzeStoresArg,
    summary: Annotated[
        bool, typer.Option("--summary", help="One row: Pearson r of lhs and rhs over steps, and their means.")
    ] = False,
    fmt: FormatOpt = Format.csv,
    out: OutOpt = None,
) -> None:
    """One-step generalization ratio: both sides of eq. 17 and eq. 20 per recorded step (needs replicates)."""
    from gentrace.analyses import osgr

    _emit(over_stores(stores, lambda reader: osgr.run(reader, summary=summary)), fmt, out)


@analyze_app.command("paths")
@user_errors
def analyze_paths(
    stores: AnalyzeStoresArg,
    layer: Annotated[str, typer.Option(help="A ReLU call site (acts/<layer>), or 'all'.")] = "all",
    kind: Annotated[
        PathKind,
        typer.Option(
            help="overlap | cross (vs the previous epoch) | self | rank (nearest neighbours) | ratio (early/mid cross)."
        ),
    ] = PathKind.overlap,
    pairs: Annotated[
        bool, typer.Option("--pairs", help="Every pair (rank: every base and other) instead of summaries.")
    ] = False,
    device: Annotated[str, typer.Option(help="Where pairwise products run: auto | cpu | cuda | cuda:N.")] = "auto",
    fmt: FormatOpt = Format.csv,
    out: OutOpt = None,
    dask: DaskOpt = None,
) -> None:
    """ReLU path similarity of the probe samples per recorded epoch and layer (image-functions paper)."""
    from gentrace.analyses import paths

    device = _device(device) or "auto"
    if dask is not None:
        _emit_on_dask(
            stores,
            lambda reader, n: paths.plan(reader, layer, kind.value, pairs, device=device, parts=n),
            dask,
            fmt,
            out,
        )
        return
    _emit(over_stores(stores, lambda reader: paths.frames(reader, layer, kind.value, pairs, device=device)), fmt, out)


@analyze_app.command("mi")
@user_errors
def analyze_mi(
    stores: AnalyzeStoresArg,
    reference: Annotated[
        MiReference,
        typer.Option(help="L: logistic regression, linear fit of f_T0, null model, or a K-layer CNN fit to f_final."),
    ] = MiReference.linear,
    split: Annotated[MiSplit, typer.Option(help="The split standing for the population.")] = MiSplit.test,
    summary: Annotated[
        bool, typer.Option("--summary", help="T0 and mu(F_T0;L)/I(F_T0;Y) for the reference and the null model.")
    ] = False,
    fmt: FormatOpt = Format.csv,
    out: OutOpt = None,
    dask: DaskOpt = None,
) -> None:
    """I(F_t;Y), I(F_t;Y_S), mu(F_t;L) and the conditional informations per recorded step, in bits."""
    from gentrace.analyses import mi

    if dask is not None:
        _emit_on_dask(
            stores,
            lambda reader, n: mi.plan(reader, reference.value, split.value, summary=summary, parts=n),
            dask,
            fmt,
            out,
        )
        return
    _emit(over_stores(stores, lambda reader: mi.run(reader, reference.value, split.value, summary=summary)), fmt, out)


class TrajectoryBy(StrEnum):
    """Granularity of `analyze trajectory`."""

    replicate = "replicate"
    epoch = "epoch"
    step = "step"


@analyze_app.command("trajectory")
@user_errors
def analyze_trajectory(
    stores: AnalyzeStoresArg,
    param: Annotated[
        str | None,
        typer.Option(help="Tensor to follow [default: the first params_fine tensor, the first layer's bias]."),
    ] = None,
    last: Annotated[
        int | None,
        typer.Option(help="step_variance over the last K snapshots [default: the last 10 epochs' worth].", min=1),
    ] = None,
    by: Annotated[
        TrajectoryBy,
        typer.Option(help="replicate: one row each; epoch: per epoch; step: cumulative length at every snapshot."),
    ] = TrajectoryBy.replicate,
    fmt: FormatOpt = Format.csv,
    out: OutOpt = None,
) -> None:
    """Trajectory length, normalized length, distance from init and step variance of a tensor (BTH paper)."""
    from gentrace.analyses import trajectory

    _emit(over_stores(stores, lambda reader: trajectory.run(reader, param, last, by.value)), fmt, out)


class Where(StrEnum):
    """Point sets of `analyze lipschitz`."""

    train = "train"
    test = "test"
    far = "far"
    all = "all"


@analyze_app.command("lipschitz")
@user_errors
def analyze_lipschitz(
    stores: AnalyzeStoresArg,
    where: Annotated[Where, typer.Option(help="train, test, far (Gaussian and midpoints) or all.")] = Where.all,
    quantiles: Annotated[
        str, typer.Option(help="Comma-separated quantiles of the per-point constants (1.0 = max).")
    ] = "0.1,0.5,0.9,1.0",
    jacobian: Annotated[
        bool, typer.Option("--jacobian", help="Spectral norm of the input Jacobian instead of the logit gradient.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N [default: cuda when present].")] = None,
    fmt: FormatOpt = Format.csv,
    out: OutOpt = None,
) -> None:
    """Local Lipschitz constants (input-gradient norms) near and far from the data, per snapshot (BTH paper)."""
    from gentrace.analyses import lipschitz

    try:
        qs = tuple(float(q) for q in quantiles.split(","))
    except ValueError:
        raise AnalysisInputError(f"--quantiles {quantiles!r}: expected numbers like 0.1,0.5,0.9,1.0") from None
    dev = _device(device)
    _emit(over_stores(stores, lambda reader: lipschitz.run(reader, where.value, qs, jacobian, dev)), fmt, out)


def _plot(name: str, stores: list[Path], out: Path, **options: Any) -> None:
    """Open the stores, draw with `plots.<name>` into `out` (matplotlib imported only now), say where."""
    from gentrace.reporting import plots

    _figure_file(out)
    if "device" in options:
        options["device"] = _device(options["device"])
    readers = [StoreReader(store) for store in stores]
    typer.echo(str(getattr(plots, name)(readers, out, **options)), err=True)


@plot_app.command("gsnr")
@user_errors
def plot_gsnr(stores: StoresArg, out: FigureOpt) -> None:
    """Mean GSNR and same-sign fraction over steps, one line per store (e.g. real vs random labels)."""
    _plot("plot_gsnr", stores, out)


@plot_app.command("osgr")
@user_errors
def plot_osgr(stores: StoresArg, out: FigureOpt) -> None:
    """OSGR left vs right side of eq. 17 per recorded step, with the Pearson r in the title."""
    _plot("plot_osgr", stores, out)


@plot_app.command("paths")
@user_errors
def plot_paths(
    stores: StoresArg,
    out: FigureOpt,
    layer: Annotated[
        str | None, typer.Option(help="Layer of the nearest-neighbour rank panels [default: the second call site].")
    ] = None,
    device: Annotated[str, typer.Option(help="Where pairwise products run: auto | cpu | cuda | cuda:N.")] = "auto",
) -> None:
    """Cross and self similarity per epoch and layer, and nearest-neighbour ranks of three base samples."""
    _plot("plot_paths", stores, out, layer=layer, device=device)


@plot_app.command("mi")
@user_errors
def plot_mi(
    stores: StoresArg,
    out: FigureOpt,
    reference: Annotated[MiReference, typer.Option(help="The reference classifier L.")] = MiReference.linear,
) -> None:
    """I(F_t;Y) and mu(F_t;L) over steps with I(L;Y) as a horizontal line (the paper's Figure 4)."""
    _plot("plot_mi", stores, out, reference=reference.value)


@plot_app.command("trajectory")
@user_errors
def plot_trajectory(stores: StoresArg, out: FigureOpt) -> None:
    """Cumulative trajectory length and distance from init over steps, one curve per store (BTH paper)."""
    _plot("plot_trajectory", stores, out)


@plot_app.command("lipschitz")
@user_errors
def plot_lipschitz(stores: StoresArg, out: FigureOpt) -> None:
    """Median local Lipschitz constant near and far from the data per snapshot, one curve per store (BTH paper)."""
    _plot("plot_lipschitz", stores, out)
