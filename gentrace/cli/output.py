"""Tables of `gentrace analyze`: the file formats of gentrace.reporting.tables, plus `table` for a terminal.

table    a rich table for reading in a terminal (all rows at once), NaN as an empty cell,
         floats with 6 significant digits.

The format is `--format` if given, else the `-o` file's extension (`.csv .tsv .json .parquet`; a
name without an extension is CSV), else CSV on stdout. Any other extension needs `--format`, and a
`--format` that contradicts a known extension is an error: a file never holds another format than
its name says.
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
# the file extension of each format; `table` has none of its own (any other extension with --format table)
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".parquet": "parquet"}


def resolve_format(fmt: str | None, out: Path | None) -> str:
    """The format a table is written in: `--format` (`fmt`), else `-o out`'s extension, else csv.

    Raises:
        ConfigError: `fmt` contradicts the extension of `out`, or `out` has an extension that names
            no format and no `fmt` is given.
    """
    if out is None:
        return fmt or "csv"
    suffix = out.suffix.lower()
    named = EXTENSIONS.get(suffix, "csv" if not suffix else None)
    known = ", ".join(EXTENSIONS)
    if fmt is None:
        if named is None:
            raise ConfigError(f"-o {out}: {out.suffix} names no table format; use one of {known}, or give --format")
        return named
    if suffix in EXTENSIONS and named != fmt:
        fix = f"name the file {out.with_suffix('.' + fmt if fmt != 'table' else '.txt').name}"
        raise ConfigError(f"--format {fmt} contradicts -o {out} (a {named} file); drop --format, or {fix}")
    return fmt


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
