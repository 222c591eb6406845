"""Offline analyses of a run store: one module per analysis (SPEC section 5).

Each module exposes `compute(arrays...) -> DataFrame` (pure NumPy in, pandas out) and
`run(reader, **options) -> DataFrame` (reads an opened store lazily). `ANALYSES` maps the name
used by `gentrace analyze NAME` to its `run`. Analyses never import `record` or `train`.
Analyses read the store in chunks (a row block at a time); gsnr, paths and mi also expose
`plan(reader, ...)`, their chunk tasks, which `plan.local` runs here and `dask_backend` on a
dask.distributed cluster (`--dask`).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from gentrace.analyses import gsnr, lipschitz, mi, osgr, paths, trajectory

ANALYSES: dict[str, Callable[..., pd.DataFrame]] = {
    "gsnr": gsnr.run,
    "lipschitz": lipschitz.run,
    "mi": mi.run,
    "osgr": osgr.run,
    "paths": paths.run,
    "trajectory": trajectory.run,
}

__all__ = ["ANALYSES", "gsnr", "lipschitz", "mi", "osgr", "paths", "trajectory"]
