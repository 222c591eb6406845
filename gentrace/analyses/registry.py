"""The analyses' registry: one `Analysis` entry per `gentrace analyze NAME` / `gentrace plot NAME`.

An entry says everything the command line needs: the command's help, its options (name, help,
default, choices, how a value is parsed), which module function computes the table (and the
`--dask` plan), which `gentrace.reporting.plots` function draws it, the streams it reads and the
commands `gentrace record` suggests for a store that has them. `gentrace.cli.analyze` builds the
typer commands from `REGISTRY`; adding an analysis = its module + one entry here + one test file.

This module imports no analysis: the command line reads it at every start, and the analyses pull in
pandas and torch. Modules are named and imported when a command runs; the plots are named for the
same reason and because analyses sit below reporting. Choice lists are written out here for that
reason too; tests/test_registry.py checks them against the modules' own constants.
"""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from gentrace.core.errors import AnalysisInputError
from gentrace.store import schema
from gentrace.store.reader import StoreReader

GSNR_BY = ("model", "layer", "param")  # gsnr.BY
PATH_KINDS = ("overlap", "cross", "self", "rank", "ratio")  # paths.KINDS
MI_REFERENCES = ("linear", "fit-linear", "null", "cnn2", "cnn4", "cnn6")  # mi_references.REFERENCES and "null"
MI_SPLITS = ("test", "train")  # information.SPLITS
TRAJECTORY_BY = ("replicate", "epoch", "step")  # trajectory.BY
LIPSCHITZ_WHERE = ("train", "test", "far", "all")  # lipschitz.WHERE


class BadOptionValue(ValueError):
    """A value an option cannot take; the command line reports it as a usage error naming the option.

    `option` is the option's name once `values` has seen the error (empty while a `parse` raises it).
    """

    option: str = ""


@dataclass(frozen=True)
class Option:
    """One `--NAME` option of a command, passed to the analysis (or plot) as the keyword argument NAME.

    Attributes:
        name: the keyword and, with `--`, the option (a bool is an on-only flag `--NAME`).
        help: the `--help` line.
        default: the value without the option.
        type: what the command line reads: str, bool, int, `str | None`, `int | None`.
        choices: the values a str option accepts, in `--help` order; empty: any.
        min: the smallest int accepted.
        parse: turns the command-line value into the keyword's value (raises BadOptionValue or a GentraceError).
    """

    name: str
    help: str
    default: Any = None
    type: Any = str
    choices: tuple[str, ...] = ()
    min: int | None = None
    parse: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Plot:
    """`gentrace plot NAME`: `plots.<function>(readers, out, **options)` of gentrace.reporting.plots.

    Without a function of its own (`Plot.of_columns`), the figure is `plots.plot_columns`: one panel
    per column of `columns` over the recorded steps (the mean over the table's other rows at each
    step), one line per store, the options passed to the analysis' `run`.
    """

    function: str
    help: str
    options: tuple[Option, ...] = ()
    columns: tuple[str, ...] = ()

    @classmethod
    def of_columns(cls, help: str, columns: tuple[str, ...], options: tuple[Option, ...] = ()) -> Plot:
        """A plot drawn from the analysis' own table: `columns` over the steps."""
        return cls("", help, options, columns)


@dataclass(frozen=True)
class Analysis:
    """One analysis as the command line sees it.

    Attributes:
        name: `gentrace analyze NAME`, `gentrace plot NAME`, the key of `ANALYSES`.
        module: the analysis module; imported only when it runs.
        help: the `analyze NAME --help` summary.
        options: the `analyze NAME` options, in `--help` order.
        streams: the streams it reads; `gentrace record` suggests it for a store that has them all.
        suggest: the suggested commands, `{path}` standing for the store.
        suggest_if: a further condition on the store for suggesting it (e.g. replicates for osgr).
        table: the module function `analyze` calls as `table(reader, **options)`: `run` (one frame) or `frames`.
        plan: the module has `plan(reader, **options)`, its chunk tasks, so `--dask` is offered.
        plan_parts: `plan` also takes `parts=`, the cluster's worker count.
        across: a module function `across(readers, **options)` giving the table of several stores as a
            whole (e.g. a correlation across a sweep's points), or None for "each store's rows"; "": none.
        plot: `gentrace plot NAME`; None: no plot command.
        hint_order: where its suggestions come among the entries' (lower first; the registry's own order
            is the `--help` order).
    """

    name: str
    module: str
    help: str
    options: tuple[Option, ...]
    streams: tuple[schema.Stream, ...]
    suggest: tuple[str, ...]
    suggest_if: Callable[[StoreReader], bool] | None = None
    table: str = "run"
    plan: bool = False
    plan_parts: bool = False
    across: str = ""
    plot: Plot | None = None
    hint_order: int = 100

    @property
    def run(self) -> Callable[..., Any]:
        """The module's `run(reader, **options) -> DataFrame`."""
        return importlib.import_module(self.module).run

    def tables(self, reader: StoreReader, options: Mapping[str, Any]) -> Any:
        """The table of one store: a DataFrame, or its row blocks."""
        return getattr(importlib.import_module(self.module), self.table)(reader, **options)

    def chunk_plan(self, reader: StoreReader, parts: int, options: Mapping[str, Any]) -> Any:
        """The chunk tasks of one store for `--dask`, split for `parts` workers where the plan takes it."""
        extra = {"parts": parts} if self.plan_parts else {}
        return importlib.import_module(self.module).plan(reader, **options, **extra)

    def across_table(self, readers: list[StoreReader], options: Mapping[str, Any]) -> Any:
        """The table of several stores as a whole (`across`), or None: each store's own rows, labelled."""
        if not self.across:
            return None
        return getattr(importlib.import_module(self.module), self.across)(readers, **options)

    def suggestions(self, reader: StoreReader) -> list[str]:
        """The suggested commands for this store: none unless it has the streams (and `suggest_if` holds)."""
        if not all(reader.has(stream.name) for stream in self.streams):
            return []
        if self.suggest_if is not None and not self.suggest_if(reader):
            return []
        path = shlex.quote(str(reader.path))  # one shell word, spaces and all: the hint runs as printed
        return [line.format(path=path) for line in self.suggest]


def values(options: Iterable[Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of an analysis (or plot): each option's given value or default, parsed, in order.

    One path for the command line (every option given, as typer read it) and `gentrace.analyze` (some
    options given, as Python values): an enum becomes its value, a value outside the option's choices
    is refused, and a str is read by the option's `parse` while any other value is taken as parsed
    (so `quantiles="0.1,0.5"` and `quantiles=(0.1, 0.5)` both work, as do `replicate="all"` and
    `replicate=None`); an option not given takes its default, parsed the same way.

    Raises:
        BadOptionValue: a value the option cannot take, with `option` set to its name.
    """
    out = {}
    for option in options:
        value = given.get(option.name, option.default)
        if isinstance(value, Enum):
            value = value.value
        try:
            if option.choices and value not in option.choices:
                raise BadOptionValue(f"{value!r} is not one of {', '.join(option.choices)}")
            if option.parse is not None and isinstance(value, str):
                value = option.parse(value)
        except BadOptionValue as exc:
            exc.option = option.name
            raise
        out[option.name] = value
    return out


def replicate(value: str) -> int | None:
    """`--replicate`: a replicate number, or 'all' (None)."""
    if value == "all":
        return None
    if value.isdigit():
        return int(value)
    raise BadOptionValue(f"give a replicate number (0, 1, ...) or 'all', not {value!r}")


def quantiles(value: str) -> tuple[float, ...]:
    """`--quantiles 0.1,0.5`: comma-separated numbers."""
    try:
        return tuple(float(q) for q in value.split(","))
    except ValueError:
        raise AnalysisInputError(f"--quantiles {value!r}: expected numbers like 0.1,0.5,0.9,1.0") from None


def device(value: str | None) -> str | None:
    """`--device` of the analyses: auto (None), cpu, cuda, cuda:N; refused before any work when it is not there."""
    from gentrace.analyses.bits import resolve_device

    return None if value in (None, "auto") else resolve_device(value)


def device_or_auto(value: str | None) -> str:
    """`--device` where the analysis takes "auto" for auto."""
    return device(value) or "auto"


def _osgr_answerable(reader: StoreReader) -> bool:
    """OSGR needs replicates and the losses at every step."""
    cfg = reader.config
    return bool(cfg["train"]["replicates"] >= 2 and cfg["record"]["eval_every_steps"] == 1)


def _classifies(reader: StoreReader) -> bool:
    """MI counts classes: a classification run."""
    return bool(reader.attrs.get("num_classes", 0))


_PATHS_DEVICE = "Where pairwise products run: auto | cpu | cuda | cuda:N."

# In the order `analyze --help` and `plot --help` list them; `hint_order` orders the post-record hints.
REGISTRY: dict[str, Analysis] = {
    entry.name: entry
    for entry in (
        Analysis(
            "gsnr",
            "gentrace.analyses.gsnr",
            "GSNR (mean, median), same-sign fraction and zero-variance count per recorded step.",
            (
                Option(
                    "by",
                    "model: one row per step and replicate; layer: per tensor; param: per parameter.",
                    "model",
                    choices=GSNR_BY,
                ),
                Option("replicate", "A replicate number, or 'all'.", "all", parse=replicate),
            ),
            streams=(schema.GRAD,),
            suggest=(
                "gentrace analyze gsnr {path}",
                "gentrace analyze gsnr {path} --by layer --format table",
                "gentrace plot gsnr {path} -o gsnr.png",
            ),
            table="frames",
            plan=True,
            plot=Plot(
                "plot_gsnr",
                "Mean GSNR and same-sign fraction over steps, one line per store (e.g. real vs random labels).",
            ),
            hint_order=0,
        ),
        Analysis(
            "osgr",
            "gentrace.analyses.osgr",
            "One-step generalization ratio: both sides of eq. 17 and eq. 20 per recorded step (needs replicates).",
            (
                Option(
                    "summary",
                    "One store: one row over its steps (means, r over steps). Several stores or a sweep "
                    "directory: one row per store at --step and the Pearson r across them (the paper's Figure 1).",
                    False,
                    bool,
                ),
                Option(
                    "step",
                    "The recorded step compared across stores [default: the first step every store has].",
                    None,
                    int | None,
                    min=0,
                ),
            ),
            streams=(schema.GRAD,),
            suggest=("gentrace analyze osgr {path} --summary", "gentrace plot osgr {path} -o osgr.png"),
            suggest_if=_osgr_answerable,
            across="across",
            plot=Plot(
                "plot_osgr",
                "One store: lhs vs rhs of eq. 17 per recorded step, coloured by step. Several stores or a sweep "
                "directory: one point per store at up to four steps, with the Pearson r across them (Figure 1).",
                (
                    Option(
                        "step",
                        "Draw only this recorded step [default: up to four steps every store has].",
                        None,
                        int | None,
                        min=0,
                    ),
                ),
            ),
            hint_order=1,
        ),
        Analysis(
            "paths",
            "gentrace.analyses.paths",
            "ReLU path similarity of the probe samples per recorded epoch and layer (image-functions paper).",
            (
                Option("layer", "A ReLU call site (acts/<layer>), or 'all'.", "all"),
                Option(
                    "kind",
                    "overlap | cross (vs the previous epoch) | self | rank (nearest neighbours) | "
                    "ratio (early/mid cross).",
                    "overlap",
                    choices=PATH_KINDS,
                ),
                Option("pairs", "Every pair (rank: every base and other) instead of summaries.", False, bool),
                Option("device", _PATHS_DEVICE, "auto", parse=device_or_auto),
            ),
            streams=(schema.ACTS,),
            suggest=("gentrace analyze paths {path} --kind self",),
            table="frames",
            plan=True,
            plan_parts=True,
            plot=Plot(
                "plot_paths",
                "Cross and self similarity per epoch and layer, and nearest-neighbour ranks of three base samples.",
                (
                    Option(
                        "layer",
                        "Layer of the nearest-neighbour rank panels [default: the second call site].",
                        None,
                        str | None,
                    ),
                    Option("device", _PATHS_DEVICE, "auto", parse=device),
                ),
            ),
            hint_order=2,
        ),
        Analysis(
            "mi",
            "gentrace.analyses.mi",
            "I(F_t;Y), I(F_t;Y_S), mu(F_t;L) and the conditional informations per recorded step, in bits.",
            (
                Option(
                    "reference",
                    "L: logistic regression, linear fit of f_T0, null model, or a K-layer CNN fit to f_final.",
                    "linear",
                    choices=MI_REFERENCES,
                ),
                Option("split", "The split standing for the population.", "test", choices=MI_SPLITS),
                Option("summary", "T0 and mu(F_T0;L)/I(F_T0;Y) for the reference and the null model.", False, bool),
            ),
            streams=(schema.PREDS,),
            suggest=("gentrace analyze mi {path} --summary",),
            suggest_if=_classifies,
            plan=True,
            plan_parts=True,
            plot=Plot(
                "plot_mi",
                "I(F_t;Y) and mu(F_t;L) over steps with I(L;Y) as a horizontal line (the paper's Figure 4).",
                (Option("reference", "The reference classifier L.", "linear", choices=MI_REFERENCES),),
            ),
            hint_order=5,
        ),
        Analysis(
            "trajectory",
            "gentrace.analyses.trajectory",
            "Trajectory length, normalized length, distance from init and step variance of a tensor (BTH paper).",
            (
                Option(
                    "param",
                    "Tensor to follow [default: the first params_fine tensor, the first layer's bias].",
                    None,
                    str | None,
                ),
                Option(
                    "last",
                    "step_variance over the last K snapshots [default: the last 10 epochs' worth].",
                    None,
                    int | None,
                    min=1,
                ),
                Option(
                    "by",
                    "replicate: one row each; epoch: per epoch; step: cumulative length at every snapshot.",
                    "replicate",
                    choices=TRAJECTORY_BY,
                ),
            ),
            streams=(schema.PARAMS_FINE,),
            suggest=("gentrace analyze trajectory {path}",),
            plot=Plot(
                "plot_trajectory",
                "Cumulative trajectory length and distance from init over steps, one curve per store (BTH paper).",
            ),
            hint_order=3,
        ),
        Analysis(
            "lipschitz",
            "gentrace.analyses.lipschitz",
            "Local Lipschitz constants (input-gradient norms) near and far from the data, per snapshot (BTH paper).",
            (
                Option("where", "train, test, far (Gaussian and midpoints) or all.", "all", choices=LIPSCHITZ_WHERE),
                Option(
                    "quantiles",
                    "Comma-separated quantiles of the per-point constants (1.0 = max).",
                    "0.1,0.5,0.9,1.0",
                    parse=quantiles,
                ),
                Option("jacobian", "Spectral norm of the input Jacobian instead of the logit gradient.", False, bool),
                Option(
                    "device", "auto | cpu | cuda | cuda:N [default: cuda when present].", None, str | None, parse=device
                ),
            ),
            streams=(schema.PARAMS,),
            suggest=("gentrace analyze lipschitz {path} --where train",),
            plot=Plot(
                "plot_lipschitz",
                "Median local Lipschitz constant near and far from the data per snapshot, "
                "one curve per store (BTH paper).",
            ),
            hint_order=4,
        ),
    )
}
