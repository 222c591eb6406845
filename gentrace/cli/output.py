"""Tables of `gentrace analyze`: the file formats of gentrace.reporting.tables, plus `table` for a terminal.

table    a rich table for reading in a terminal (all rows at once), NaN as an empty cell,
         floats with 6 significant digits.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from gentrace.core.errors import ConfigError
from gentrace.reporting import tables

FORMATS = (*tables.FORMATS, "table")


def write(table: pd.DataFrame | Iterable[pd.DataFrame], fmt: str = "csv", out: Path | None = None) -> None:
    """Write a table (or its pieces) as `fmt` to `out`, or to stdout when `out` is None.

    Raises:
        ConfigError: unknown format, or parquet without an output file.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "table":
        tables.write(table, fmt, out)
        return
    pieces = [table] if isinstance(table, pd.DataFrame) else list(table)
    if not pieces:
        return
    with tables.text_output(out) as stream:
        _table(pd.concat(pieces, ignore_index=True), stream)


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.6g}"
    return str(value)


def _table(frame: pd.DataFrame, stream: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    # A terminal wraps the table at its own width; a file or a pipe gets it at its natural width.
    console = Console(file=stream, width=None if stream.isatty() else 10_000)
    console.print(table)
