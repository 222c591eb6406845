"""Offline analyses of a run store: one module per analysis (SPEC section 5).

Each module exposes `compute(arrays...) -> DataFrame` (pure NumPy in, pandas out) and
`run(reader, **options) -> DataFrame` (reads an opened store lazily). `REGISTRY`
(gentrace.analyses.registry) holds one entry per analysis, from which the command line builds
`gentrace analyze NAME` and `gentrace plot NAME`; `ANALYSES` maps each NAME to its module's `run`.
Analyses never import `record` or `train`.
Analyses read the store in chunks (a row block at a time); gsnr, paths and mi also expose
`plan(reader, ...)`, their chunk tasks, which `plan.local` runs here and `dask_backend` on a
dask.distributed cluster (`--dask`).

The modules are imported on first use (`ANALYSES[name]`, `gentrace.analyses.gsnr`): the command
line reads the registry at every start, and the analyses pull in pandas and torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING

from gentrace.analyses.registry import REGISTRY, Analysis

if TYPE_CHECKING:
    import pandas as pd

    from gentrace.analyses import gsnr, lipschitz, mi, osgr, paths, trajectory


class _Runs(Mapping[str, Callable[..., "pd.DataFrame"]]):
    """NAME -> the analysis module's `run(reader, **options) -> DataFrame`, imported when looked up."""

    def __getitem__(self, name: str) -> Callable[..., pd.DataFrame]:
        return REGISTRY[name].run

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


ANALYSES: Mapping[str, Callable[..., pd.DataFrame]] = _Runs()

_MODULES = ("gsnr", "lipschitz", "mi", "osgr", "paths", "trajectory")


def __getattr__(name: str) -> ModuleType:
    """`gentrace.analyses.gsnr` without importing it first, as when this package imported every module."""
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ANALYSES", "REGISTRY", "Analysis", "gsnr", "lipschitz", "mi", "osgr", "paths", "trajectory"]
