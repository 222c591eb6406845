"""gentrace: record a training run once into a crash-safe Zarr store, diagnose generalization offline.

The library face, the same paths the command line takes:

    import gentrace

    path = gentrace.record_run(out="runs/quickstart.zarr")  # `gentrace record --out runs/quickstart.zarr`
    store = gentrace.open(path)                             # a read-only StoreReader
    table = gentrace.analyze(store, "gsnr", by="layer")     # `gentrace analyze gsnr STORE --by layer`

`gentrace.Run` records a training loop of your own (gentrace.training.own_loop). Every name is imported
on first use (the module `__getattr__`), so `import gentrace` stays light for the command line: it loads
neither torch, pandas nor zarr.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gentrace.core.version import __version__

if TYPE_CHECKING:
    import pandas as pd

    from gentrace.core.config import RunConfig
    from gentrace.store.reader import StoreReader
    from gentrace.training.own_loop import Run

__all__ = ["GentraceError", "Run", "StoreReader", "__version__", "analyze", "open", "record_run"]

StorePath = str | os.PathLike[str]


def open(path: StorePath) -> StoreReader:  # shadows the builtin inside this module only, as zarr.open does
    """Open a store written by `gentrace record` or `gentrace.Run`, read-only.

    Args:
        path: the store directory.

    Returns:
        A gentrace.store.reader.StoreReader: `attrs`, `config`, `status`, `committed(stream)`, and
        `array(path)` / `lazy(path)` sliced to the committed rows (path names from gentrace.store.schema).

    Raises:
        StoreError: the path is not a gentrace store (missing, foreign, newer schema, being compacted).
    """
    from gentrace.store.reader import StoreReader

    return StoreReader(Path(path))


def analyze(
    store: StoreReader | StorePath | Sequence[StoreReader | StorePath], name: str, **options: Any
) -> pd.DataFrame:
    """Run the analysis NAME, as `gentrace analyze NAME` does, and return its table.

    The analysis, its options and their defaults are the registry's entry (gentrace.analyses.registry),
    the ones `gentrace analyze NAME --help` lists: `analyze(store, "gsnr", by="layer")` is the table
    `gentrace analyze gsnr STORE --by layer` prints. Option values are Python values or the strings the
    command line takes (`quantiles=(0.1, 0.9)` or `quantiles="0.1,0.9"`); a bool option is a flag
    (`summary=True`).

    Args:
        store: a store (path or opened reader), a sweep directory, or a list of them; with several
            stores the rows gain a `store` column and one per config key that differs, as on the
            command line.
        name: gsnr, osgr, paths, mi, trajectory or lipschitz (`gentrace.analyses.REGISTRY`).
        **options: the analysis' options by their `--NAME` (dashes as underscores), and any further
            keyword of the analysis module's function (`model=net` for lipschitz on a `gentrace.Run` store,
            `rtol=` for gsnr), passed as given.

    Returns:
        The table as one DataFrame (the row blocks of gsnr, paths and mi concatenated; an empty
        DataFrame when the analysis yields no rows).

    Raises:
        AnalysisInputError: an unknown analysis or option, or a value the option cannot take.
        GentraceError: whatever the analysis refuses (a missing stream, too few replicates, ...).
    """
    import pandas as pd

    from gentrace.analyses import registry
    from gentrace.core.errors import AnalysisInputError
    from gentrace.store.reader import StoreReader
    from gentrace.training.sweep import analysis_table

    entry = registry.REGISTRY.get(name)
    if entry is None:
        raise AnalysisInputError(f"no analysis {name!r}; choose one of: {', '.join(registry.REGISTRY)}")
    function = getattr(importlib.import_module(entry.module), entry.table)
    known = [option.name for option in entry.options]
    extra = [key for key in inspect.signature(function).parameters if key != "reader" and key not in known]
    unknown = sorted(set(options) - set(known) - set(extra))
    if unknown:
        raise AnalysisInputError(
            f"analysis {name} has no option {unknown[0]!r}; its options are: {', '.join(known + extra)}"
        )
    try:
        values = registry.values(entry.options, options)
    except registry.BadOptionValue as exc:
        raise AnalysisInputError(f"analysis {name}, option {exc.option}: {exc}") from None
    values |= {key: value for key, value in options.items() if key in extra}
    if isinstance(store, StoreReader):
        table = entry.tables(store, values)
    else:
        stores = [store] if isinstance(store, str | os.PathLike) else list(store)
        paths = [item.path if isinstance(item, StoreReader) else Path(item) for item in stores]
        table = analysis_table(entry, paths, values)
    if isinstance(table, pd.DataFrame):
        return table
    pieces = list(table)
    return pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame()


def record_run(
    config: RunConfig | StorePath | None = None,
    out: StorePath | None = None,
    *,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Train and record a run, as `gentrace record` does (without the progress bar), and return its store path.

    Not `gentrace.record`: that name is the probes' package (gentrace.record), which Python binds on the
    package as soon as any probe is imported.

    Args:
        config: a TOML config file, a RunConfig (gentrace.core.config.load), or None for the built-in
            quick start (`sample_configs/quickstart.toml`); with `resume`, None continues the stored config.
        out: the store path [default: runs/<config name>-<timestamp>.zarr].
        overrides: `--set` overrides, as {"train.lr": 0.1} (values written as TOML) or ["train.lr=0.1"];
            not with a RunConfig (change that with dataclasses.replace).
        device: auto, cpu, cuda or cuda:N.
        resume: continue the killed or interrupted run stored at `out`.
        overwrite: replace an existing store at `out`.

    Raises:
        ConfigError: a bad config, override, device or store path, or a run this machine cannot hold.
        GentraceError: whatever `gentrace record` reports as an `error:` line (a diverged loss, a full disk, ...).
    """
    from gentrace.core import config as config_mod
    from gentrace.training import preflight, run

    items = (
        [f"{key}={config_mod.toml_value(value)}" for key, value in overrides.items()]
        if isinstance(overrides, Mapping)
        else [str(item) for item in overrides]
    )
    if isinstance(config, config_mod.RunConfig):
        if items:
            raise config_mod.ConfigError(
                "gentrace.record_run: overrides apply to a config file or the quick start, not to a RunConfig; "
                "use dataclasses.replace on it"
            )
        cfg: RunConfig | None = config
    elif resume and config is None:
        if items:
            raise config_mod.ConfigError(
                "gentrace.record_run(resume=True) continues the stored config; overrides cannot change it"
            )
        cfg = None
    else:
        cfg = config_mod.load(None if config is None else Path(config), items)
    target = None if out is None else Path(out)
    preflight.record(cfg, target, device=device, resume=resume, overwrite=overwrite)
    return run.record(cfg, target, device=device, resume=resume, overwrite=overwrite)


def __getattr__(name: str) -> Any:
    """`gentrace.Run`, `gentrace.StoreReader` and `gentrace.GentraceError`, imported on first use."""
    if name == "Run":
        from gentrace.training.own_loop import Run

        return Run
    if name == "StoreReader":
        from gentrace.store.reader import StoreReader

        return StoreReader
    if name == "GentraceError":
        from gentrace.core.errors import GentraceError

        return GentraceError
    raise AttributeError(f"module 'gentrace' has no attribute {name!r}")
