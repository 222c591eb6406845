"""`gentrace analyze ...` and `gentrace plot ...`: parse -> call an analysis -> write a table or a figure.

The commands are built from the analyses' registry (gentrace.analyses.registry): one `analyze NAME`
and one `plot NAME` per entry, with the entry's help and options. Tables go to stdout as CSV unless
`--format` or `-o` say otherwise (gentrace.cli.output: the `-o` extension picks the format); figures go
to the `-o` file (gentrace.reporting.plots). A file written is named on stdout, its one line. The
analyses, pandas and matplotlib are imported inside the commands, so `gentrace --help` and
`gentrace record` do not pay for them.
"""

from __future__ import annotations

import errno
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gentrace.analyses import registry
from gentrace.analyses.registry import REGISTRY, Analysis, BadOptionValue, Option, Plot
from gentrace.cli.errors import user_errors
from gentrace.core.errors import ConfigError
from gentrace.store.reader import StoreReader
from gentrace.training.sweep import analysis_table, expand_stores, over_stores

if TYPE_CHECKING:
    import pandas as pd


class Format(StrEnum):
    """Table formats of gentrace.cli.output."""

    csv = "csv"
    tsv = "tsv"
    json = "json"
    parquet = "parquet"
    table = "table"


StoresArg = Annotated[
    list[Path], typer.Argument(help="Stores written by `gentrace record`, or sweep directories.", show_default=False)
]
AnalyzeStoresArg = Annotated[
    list[Path],
    typer.Argument(
        help="One or more stores, or sweep directories; with several, rows gain `store` and the differing config keys.",
        show_default=False,
    ),
]
FormatOpt = Annotated[
    Format | None,
    typer.Option(
        "--format", "-f", help="Table format; without it, the -o file's extension (.csv .tsv .json .parquet), else csv."
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Write to this file instead of stdout (its path is then printed on stdout)."),
]
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


def _figure_file(out: Path) -> Path:
    """`plot -o FIG`: the file matplotlib will write, checked writable and of a format it can write (.png, .pdf, ...).

    A name without an extension gets matplotlib's default format's (`savefig.format`, png) appended, as
    savefig does: `-o outdir` writes and prints `outdir.png`.
    """
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    if not out.suffix and not out.is_dir():
        out = out.with_name(f"{out.name}.{matplotlib.rcParams['savefig.format']}")
    _writable(out, "figure.png")

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in formats:
        known = ", ".join(f".{f}" for f in sorted(formats))
        raise ConfigError(f"-o {out}: matplotlib cannot write {out.suffix} figures; use one of {known}")
    return out


def _emit(table: pd.DataFrame | Iterable[pd.DataFrame], fmt: str, out: Path | None) -> None:
    """Write the table as `fmt` (resolved by `output.resolve_format`) to `out`, or to stdout.

    With `-o`, the file written is the one line on stdout (the rule of every command that writes a file).
    """
    from gentrace.cli import output as report

    _writable(out)
    try:
        report.write(table, fmt, out)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, like any Unix filter.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(141) from None
    if out is not None:
        typer.echo(str(out))


def _emit_on_dask(
    stores: list[Path], make_plan: Callable[[StoreReader, int], Any], address: str, fmt: str, out: Path | None
) -> None:
    """`--dask ADDRESS`: run each store's plan on the cluster (gentrace.analyses.dask_backend), same table."""
    from gentrace.analyses import dask_backend

    _writable(out)
    with dask_backend.connect(address) as client:
        parts = dask_backend.parts(client)
        _emit(over_stores(stores, lambda reader: dask_backend.frames(make_plan(reader, parts), client)), fmt, out)


ANALYZE_HELP = "Compute a diagnostic from a store; CSV on stdout (--format, -o change that)."
PLOT_HELP = "Draw a diagnostic of one or more stores into an image file."
_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _parameter(option: Option) -> inspect.Parameter:
    """The typer parameter of a registry option: a choice list becomes an enum, a bool an on-only `--NAME` flag."""
    kind: Any = option.type
    default = option.default
    if option.choices:
        choices: Any = StrEnum(option.name.title(), [(choice, choice) for choice in option.choices])  # type: ignore[misc]
        kind, default = choices, choices(default)
    declared = (f"--{option.name}",) if option.type is bool else ()
    annotated: Any = Annotated  # the type is a value here, which static checkers refuse inside Annotated[...]
    return inspect.Parameter(
        option.name,
        _KEYWORD,
        default=default,
        annotation=annotated[kind, typer.Option(*declared, help=option.help, min=option.min)],
    )


def _values(options: Iterable[Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the analysis (or plot): registry.values, a bad value a usage error of its option."""
    try:
        return registry.values(options, given)
    except BadOptionValue as exc:
        raise typer.BadParameter(str(exc), param_hint=f"--{exc.option}") from None


def _signed(
    command: Callable[..., None], name: str, doc: str, parameters: list[inspect.Parameter]
) -> Callable[..., None]:
    """`command` with user errors reported (gentrace.cli.errors) and the signature typer reads its options from."""
    wrapped = user_errors(command)
    wrapped.__name__ = name
    wrapped.__doc__ = doc
    wrapped.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return wrapped


_RESERVED = ("stores", "fmt", "out", "dask")


def analyze_command(entry: Analysis) -> Callable[..., None]:
    """`gentrace analyze NAME`: the entry's options, then --format, -o and (with a plan) --dask."""
    clash = [option.name for option in entry.options if option.name in _RESERVED]
    if clash:
        raise ValueError(f"analysis {entry.name}: options {clash} clash with the command's own {_RESERVED}")

    def command(
        stores: list[Path], fmt: Format | None, out: Path | None, dask: str | None = None, **given: Any
    ) -> None:
        from gentrace.cli.output import resolve_format

        table_format = resolve_format(None if fmt is None else fmt.value, out)  # before any work
        values = _values(entry.options, given)
        if dask is not None:
            plan = entry.chunk_plan
            _emit_on_dask(stores, lambda reader, parts: plan(reader, parts, values), dask, table_format, out)
            return
        _emit(analysis_table(entry, stores, values), table_format, out)

    parameters = [
        inspect.Parameter("stores", _KEYWORD, annotation=AnalyzeStoresArg),
        *(_parameter(option) for option in entry.options),
        inspect.Parameter("fmt", _KEYWORD, default=None, annotation=FormatOpt),
        inspect.Parameter("out", _KEYWORD, default=None, annotation=OutOpt),
    ]
    if entry.plan:
        parameters.append(inspect.Parameter("dask", _KEYWORD, default=None, annotation=DaskOpt))
    return _signed(command, f"analyze_{entry.name}", entry.help, parameters)


def plot_command(entry: Analysis, plot: Plot) -> Callable[..., None]:
    """`gentrace plot NAME`: open the stores, draw with `plots.<function>` into `-o` (matplotlib imported only now).

    A plot without a function of its own draws the entry's table (`plots.plot_columns` of `plot.columns`).
    """

    def command(stores: list[Path], out: Path, **given: Any) -> None:
        from gentrace.reporting import plots

        out = _figure_file(out)
        values = _values(plot.options, given)
        readers = [StoreReader(store) for store in expand_stores(stores)]
        if plot.function:
            drawn = getattr(plots, plot.function)(readers, out, **values)
        else:
            drawn = plots.plot_columns(readers, out, lambda r: entry.run(r, **values), plot.columns, entry.name)
        typer.echo(str(drawn))  # the figure is what `plot` produces: its path is the one line on stdout

    parameters = [
        inspect.Parameter("stores", _KEYWORD, annotation=StoresArg),
        inspect.Parameter("out", _KEYWORD, annotation=FigureOpt),
        *(_parameter(option) for option in plot.options),
    ]
    return _signed(command, plot.function or f"plot_{entry.name}", plot.help, parameters)


def build(registry: Mapping[str, Analysis] = REGISTRY) -> tuple[typer.Typer, typer.Typer]:
    """The `analyze` and `plot` apps: one command per registry entry, in the registry's order."""
    analyze = typer.Typer(help=ANALYZE_HELP, no_args_is_help=True)
    plot = typer.Typer(help=PLOT_HELP, no_args_is_help=True)
    for name, entry in registry.items():
        analyze.command(name)(analyze_command(entry))
        if entry.plot is not None:
            plot.command(name)(plot_command(entry, entry.plot))
    return analyze, plot


analyze_app, plot_app = build()
