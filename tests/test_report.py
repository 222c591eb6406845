"""gentrace.cli.output over gentrace.reporting.tables: every format round-trips; pieces stream; bad requests fail."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gentrace.cli import output as report
from gentrace.core.errors import AnalysisInputError, ConfigError


def table(start: int = 0, rows: int = 3) -> pd.DataFrame:
    step = np.arange(start, start + rows, dtype=np.int64)
    return pd.DataFrame(
        {
            "step": step,
            "layer": [f"features.{i}.weight" for i in step],
            "gsnr_mean": 1 / 3 + step * 1e-9,  # needs all 17 digits to round-trip
            "same_sign": np.where(step % 2 == 0, np.nan, 0.5),
        }
    )


@pytest.mark.parametrize(("fmt", "sep"), [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_to_stdout(capsys: pytest.CaptureFixture[str], fmt: str, sep: str) -> None:
    report.write(table(), fmt)
    out = capsys.readouterr().out
    header, first, second = out.splitlines()[:3]
    assert header == sep.join(["step", "layer", "gsnr_mean", "same_sign"])  # no index column
    assert first.endswith(sep)  # NaN is an empty field
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(out), sep=sep), table(), check_dtype=False)


def test_json_records(capsys: pytest.CaptureFixture[str]) -> None:
    report.write(table(), "json")
    records = json.loads(capsys.readouterr().out)
    assert [list(r) for r in records] == [["step", "layer", "gsnr_mean", "same_sign"]] * 3
    assert records[0]["same_sign"] is None
    assert records[1]["same_sign"] == 0.5
    np.testing.assert_allclose([r["gsnr_mean"] for r in records], table()["gsnr_mean"], rtol=1e-14)


def test_parquet_needs_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="-o FILE"):
        report.write(table(), "parquet")
    out = tmp_path / "t.parquet"
    report.write(table(), "parquet", out)
    pd.testing.assert_frame_equal(pd.read_parquet(out), table(), check_dtype=False)


def test_rich_table(tmp_path: Path) -> None:
    out = tmp_path / "t.txt"
    report.write(table(), "table", out)
    text = out.read_text()
    assert "gsnr_mean" in text
    assert "features.2.weight" in text
    assert "0.333333" in text
    assert "nan" not in text.lower()


def test_unknown_format() -> None:
    with pytest.raises(ConfigError, match="csv, tsv, json, parquet, table"):
        report.write(table(), "xlsx")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "parquet", "table"])
def test_pieces_equal_the_whole(tmp_path: Path, fmt: str) -> None:
    """An analysis streaming one step at a time writes exactly what the concatenated table gives."""
    whole, pieces = tmp_path / f"whole.{fmt}", tmp_path / f"pieces.{fmt}"
    report.write(pd.concat([table(0), table(3), table(6)], ignore_index=True), fmt, whole)
    report.write(iter([table(0), table(3), table(6)]), fmt, pieces)
    if fmt == "parquet":
        pd.testing.assert_frame_equal(pd.read_parquet(pieces), pd.read_parquet(whole))
    else:
        assert pieces.read_text() == whole.read_text()


def test_failing_analysis_leaves_no_file(tmp_path: Path) -> None:
    def failing() -> Iterator[pd.DataFrame]:
        raise AnalysisInputError("nothing to analyse")
        yield table()  # pragma: no cover

    out = tmp_path / "out.csv"
    with pytest.raises(AnalysisInputError):
        report.write(failing(), "csv", out)
    assert not out.exists()
