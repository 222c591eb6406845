"""What `analyze -o` and `plot -o` write and print, and how a mistyped choice is reported (issue 17).

- The table format follows the `-o` file's extension (.csv .tsv .json .parquet; none: CSV); a
  `--format` that contradicts a known extension, or an unknown extension without `--format`, is one
  error line, exit 2, and no file.
- The thing a command produces (the file written with -o, the figure) is the one line on stdout.
- Choice errors carry no pydantic `Value error, ` prefix and suggest the closest choice.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import one_error_line
from typer.testing import CliRunner, Result

from gentrace.cli.app import app, main

GSNR = ("analyze", "gsnr")


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def csv_table(reference_store: Path) -> pd.DataFrame:
    """`analyze gsnr --by layer` as printed on stdout (CSV)."""
    done = _cli(*GSNR, reference_store, "--by", "layer")
    assert done.exit_code == 0, done.output
    return pd.read_csv(io.StringIO(done.stdout))


Read = Callable[[Path], pd.DataFrame]
FILES: list[tuple[str, tuple[str, ...], Read, bytes]] = [
    ("out.csv", (), pd.read_csv, b"step,"),
    ("out.tsv", (), partial(pd.read_csv, sep="\t"), b"step\t"),
    ("out.json", (), pd.read_json, b'[{"step":'),
    ("out.parquet", (), pd.read_parquet, b"PAR1"),
    ("OUT.JSON", (), pd.read_json, b'[{"step":'),  # the extension in any case
    ("out", (), pd.read_csv, b"step,"),  # no extension: CSV, as on stdout
    ("out.json", ("--format", "json"), pd.read_json, b'[{"step":'),  # --format agreeing with the name
    ("out.dat", ("--format", "tsv"), partial(pd.read_csv, sep="\t"), b"step\t"),  # an extension that names none
]


@pytest.mark.parametrize(("name", "fmt", "read", "magic"), FILES, ids=[f"{f[0]}{''.join(f[1])}" for f in FILES])
def test_the_file_name_picks_the_format(
    reference_store: Path,
    csv_table: pd.DataFrame,
    tmp_path: Path,
    name: str,
    fmt: tuple[str, ...],
    read: Read,
    magic: bytes,
) -> None:
    out = tmp_path / name
    done = _cli(*GSNR, reference_store, "--by", "layer", *fmt, "-o", out)
    assert done.exit_code == 0, done.output
    assert done.stdout == f"{out}\n"  # the file written is the one line on stdout
    assert out.read_bytes().startswith(magic)
    pd.testing.assert_frame_equal(read(out), csv_table, check_dtype=False)


def test_stdout_stays_csv_unless_format_says_otherwise(reference_store: Path, csv_table: pd.DataFrame) -> None:
    done = _cli(*GSNR, reference_store, "--by", "layer", "--format", "json")
    assert done.exit_code == 0, done.output
    pd.testing.assert_frame_equal(pd.DataFrame(json.loads(done.stdout)), csv_table, check_dtype=False)


BAD: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("json-into-csv", ("--format", "json", "-o", "{tmp}/out.csv"), ("--format json", "out.csv", "out.json")),
    ("csv-into-parquet", ("-f", "csv", "-o", "{tmp}/out.parquet"), ("--format csv", "out.parquet", "out.csv")),
    ("table-into-tsv", ("--format", "table", "-o", "{tmp}/out.tsv"), ("--format table", "out.tsv", "out.txt")),
    ("unknown-extension", ("-o", "{tmp}/out.xlsx"), ("out.xlsx", ".xlsx", ".csv, .tsv, .json, .parquet", "--format")),
]


@pytest.mark.parametrize(("args", "names"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_format_the_file_name_does_not_say_is_refused(
    reference_store: Path, tmp_path: Path, args: tuple[str, ...], names: tuple[str, ...]
) -> None:
    done = _cli(*GSNR, reference_store, *(a.format(tmp=tmp_path) for a in args))
    assert done.exit_code == 2, done.output
    assert done.stdout == ""
    line = one_error_line(done.stderr)
    for name in names:
        assert name in line
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_plot_prints_the_file_it_wrote(reference_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "outdir"
    done = _cli("plot", "gsnr", reference_store, "-o", out)
    assert done.exit_code == 0, done.output
    assert done.stdout == f"{out}.png\n"  # matplotlib adds .png to a name without an extension: say so
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"
    assert not out.exists()
    pdf = tmp_path / "gsnr.pdf"
    done = _cli("plot", "gsnr", reference_store, "-o", pdf)
    assert done.exit_code == 0, done.output
    assert done.stdout == f"{pdf}\n"
    assert pdf.read_bytes()[:4] == b"%PDF"


CHOICES = [
    (
        ("analyze", "paths", "x.zarr", "--kind", "crosss"),
        "error: Invalid value for '--kind': 'crosss' is not one of 'overlap', 'cross', 'self', 'rank', 'ratio'; "
        "did you mean `cross`?",
    ),
    (
        ("analyze", "gsnr", "x.zarr", "--by", "zzz"),  # nothing close: no guess
        "error: Invalid value for '--by': 'zzz' is not one of 'model', 'layer', 'param'.",
    ),
    (
        ("analyze", "gsnr", "x.zarr", "--format", "jsn"),
        "error: Invalid value for '--format' / '-f': 'jsn' is not one of 'csv', 'tsv', 'json', 'parquet', 'table'; "
        "did you mean `json`?",
    ),
    (
        ("plot", "mi", "x.zarr", "-o", "mi.png", "--reference", "lineer"),
        "error: Invalid value for '--reference': 'lineer' is not one of 'linear', 'fit-linear', 'null', 'cnn2', "
        "'cnn4', 'cnn6'; did you mean `linear`?",
    ),
]


@pytest.mark.parametrize(("args", "expected"), CHOICES, ids=[c[0][-2] for c in CHOICES])
def test_a_mistyped_choice_is_one_clean_line_with_the_closest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], expected: str
) -> None:
    monkeypatch.setattr(sys, "argv", ["gentrace", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    captured: Any = capsys.readouterr()
    assert captured.out == ""
    assert one_error_line(captured.err) == expected
