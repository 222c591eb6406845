"""The one place that writes analysis tables to files and stdout: CSV, TSV, JSON or parquet (SPEC section 1).

Output goes to stdout unless a file is given; progress and errors never do, so `> file.csv` is
always clean. A table may arrive as one DataFrame or as an iterable of DataFrames with the same
columns (an analysis streaming one recorded step at a time): CSV, TSV, JSON and parquet are then
written piece by piece, so a per-parameter table larger than memory still goes through.

Formats:
    csv      header row, one row per observation, no index column, NaN as an empty field.
    tsv      the same, tab-separated.
    json     one array of records (`[{"step": 0, ...}, ...]`), NaN as null.
    parquet  needs -o FILE (binary); pyarrow.

The fifth format of `gentrace analyze --format`, `table` (a rich table for a terminal), is drawn by
gentrace.cli.output: the cli package is the only one that imports rich.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pandas as pd

from gentrace.core.errors import ConfigError

FORMATS = ("csv", "tsv", "json", "parquet")
# pandas writes JSON floats with 10 significant digits by default; 15 is its maximum.
JSON_DIGITS = 15


def write(table: pd.DataFrame | Iterable[pd.DataFrame], fmt: str = "csv", out: Path | None = None) -> None:
    """Write a table (or its pieces) as `fmt` to `out`, or to stdout when `out` is None.

    Raises:
        ConfigError: unknown format, or parquet without an output file.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "parquet" and out is None:
        raise ConfigError("--format parquet writes a binary file: give it with -o FILE")
    pieces = iter([table]) if isinstance(table, pd.DataFrame) else iter(table)
    # The first piece is computed before the output opens: an analysis that fails at once leaves no file.
    first = next(pieces, None)
    if first is None:
        return
    chained = _chain(first, pieces)
    if fmt == "parquet":
        assert out is not None
        _parquet(chained, out)
        return
    with text_output(out) as stream:
        if fmt in ("csv", "tsv"):
            for i, piece in enumerate(chained):
                piece.to_csv(stream, sep="," if fmt == "csv" else "\t", index=False, header=i == 0)
        else:
            _json(chained, stream)


def _chain(first: pd.DataFrame, rest: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    yield first
    yield from rest


@contextmanager
def text_output(out: Path | None) -> Iterator[IO[str]]:
    """A text stream to `out` (created or truncated), or stdout (flushed at the end) when `out` is None."""
    if out is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(out, "w", encoding="utf-8", newline="") as stream:
        yield stream


def _json(pieces: Iterable[pd.DataFrame], stream: IO[str]) -> None:
    stream.write("[")
    written = False
    for piece in pieces:
        if piece.empty:
            continue
        records = piece.to_json(orient="records", double_precision=JSON_DIGITS)
        stream.write(("," if written else "") + records[1:-1])
        written = True
    stream.write("]\n")


def _parquet(pieces: Iterable[pd.DataFrame], out: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # a dependency of gentrace: missing only from a broken or partial install
        raise ConfigError(f"-o {out}: writing parquet needs pyarrow; pip install pyarrow") from None

    writer: Any = None
    try:
        for piece in pieces:
            if writer is None:
                batch = pa.Table.from_pandas(piece, preserve_index=False)
                writer = pq.ParquetWriter(out, batch.schema)
            else:
                batch = pa.Table.from_pandas(piece, schema=writer.schema, preserve_index=False)
            writer.write_table(batch)
    finally:
        if writer is not None:
            writer.close()
