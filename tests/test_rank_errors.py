"""Under torchrun a rank other than 0 prints its own user errors as `error: [rank N] ...`, except PeerFailed.

In-process: the CLI's real error path (`gentrace.cli.main` and `user_errors`) with the environment
torchrun gives rank 1 of 2. test_distributed.py launches torchrun for the same, once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from gentrace.cli import app as cli
from gentrace.cli.errors import user_errors
from gentrace.core.errors import DataError, PeerFailed


def _main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr("sys.argv", ["gentrace", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return int(exit_.value.code or 0)


@pytest.mark.parametrize(("rank", "prefix"), [("1", "error: [rank 1] "), ("0", "error: ")])
def test_each_rank_reports_its_own_error(
    rank: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    missing = tmp_path / "missing.zarr"
    assert _main(monkeypatch, "info", str(missing)) != 0
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(prefix)
    assert str(missing) in line
    assert not line[len(prefix) :].startswith("[rank")


def test_rank_1_error_of_its_own(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    @user_errors
    def build() -> None:
        raise DataError("data.root = 'data/mnist' holds no MNIST files")

    with pytest.raises(typer.Exit) as exit_:
        build()
    assert exit_.value.exit_code == DataError.exit_code
    assert capsys.readouterr().err.splitlines() == ["error: [rank 1] data.root = 'data/mnist' holds no MNIST files"]


def test_peer_failed_stays_silent(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 0 failed first and printed why: the ranks that stop because of it add nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    @user_errors
    def store() -> None:
        raise PeerFailed("rank 0 could not open the store; it reported why")

    with pytest.raises(typer.Exit) as exit_:
        store()
    assert exit_.value.exit_code == 1
    assert capsys.readouterr().err == ""
