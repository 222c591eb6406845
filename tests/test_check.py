"""`gentrace check`: the dry run matches what `record` writes, writes nothing, and fails as `record` fails.

The quick start with 2 epochs is checked (CLI and library) and recorded once, up front; every
number of the check is compared with the recorded store.
"""

from __future__ import annotations

import io
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import TINY, concurrently, one_error_line, run_cli, tiny_config

from gentrace.core import config
from gentrace.record.recorder import DiscardSink
from gentrace.store.reader import StoreReader, disk_usage
from gentrace.training import check, run

ARGS = ("--set", "train.epochs=2", "--device", "cpu")


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The check (in an empty directory) and the record of the same config, run side by side."""
    empty = tmp_path_factory.mktemp("check-cwd")
    store = tmp_path_factory.mktemp("record") / "qs.zarr"
    jobs = concurrently(
        {
            "check": lambda: run_cli("check", *ARGS, cwd=empty),
            "record": lambda: run_cli("record", *ARGS, "--out", store, "--quiet", timeout=300),
        }
    )
    recorded = jobs["record"].result()
    assert recorded.returncode == 0, recorded.stderr
    return {"check": jobs["check"].result(), "cwd": empty, "reader": StoreReader(store)}


@pytest.fixture(scope="module")
def table(done: dict[str, Any]) -> pd.DataFrame:
    checked: subprocess.CompletedProcess[str] = done["check"]
    assert checked.returncode == 0, checked.stderr
    return pd.read_csv(io.StringIO(checked.stdout)).set_index("stream")


def test_stdout_is_a_csv_with_one_row_per_recorded_stream(done: dict[str, Any], table: pd.DataFrame) -> None:
    reader: StoreReader = done["reader"]
    assert ["stream", *table.columns] == list(check.COLUMNS)
    assert set(table.index) == set(reader.streams())
    for stream, paths in reader.streams().items():
        assert table.loc[stream, "arrays"] == len(paths), stream
        assert table.loc[stream, "rows"] == reader.committed(stream) > 0, stream


def test_bytes_per_row_is_what_the_store_holds_per_row(done: dict[str, Any], table: pd.DataFrame) -> None:
    reader: StoreReader = done["reader"]
    for stream, paths in reader.streams().items():
        expected = sum(reader.logical_bytes(path) for path in paths) / reader.committed(stream)
        assert table.loc[stream, "bytes_per_row"] == expected, stream
        assert table.loc[stream, "raw_mib"] == pytest.approx(expected * reader.committed(stream) / 2**20, abs=1e-6)


def test_what_names_every_tensor_and_call_site(done: dict[str, Any], table: pd.DataFrame) -> None:
    reader: StoreReader = done["reader"]
    assert table.loc["grad", "what"].startswith(f"sum sumsq pos neg of {len(reader.grad_tensor_names())} tensors: ")
    assert table.loc["params", "what"].startswith(f"{len(reader.tensor_names('params'))} tensors: 0.weight 128x64")
    sites = [f"{site} (128 units)" for site in reader.act_layers()]
    assert table.loc["acts", "what"] == f"{len(sites)} call sites: {'; '.join(sites)}; 128 probe samples"


def test_nothing_is_written(done: dict[str, Any]) -> None:
    cwd: Path = done["cwd"]
    assert not (cwd / "runs").exists()
    assert list(cwd.iterdir()) == []  # the preflight's write probe is gone too


def test_stderr_summarizes_and_names_the_next_command(done: dict[str, Any]) -> None:
    stderr = done["check"].stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines[0].startswith(f"model: {64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10:,} parameters x 2 replicate")
    assert any(line.startswith("estimated run time: ") and "an estimate" in line for line in lines)
    assert any(line.startswith("estimated store size: ") and "free at runs/: " in line for line in lines)
    assert lines[-2] == "next, record it:"
    # run_cli starts `python -m gentrace`: the hint names that program, as it can be run (gentrace.cli.hints)
    python = "python" if Path(shutil.which("python") or "").parent == Path(sys.executable).parent else sys.executable
    assert shlex.split(lines[-1]) == [python, "-m", "gentrace", "record", "--set", "train.epochs=2", "--device", "cpu"]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, check.CheckSummary]:
    """The library call on the same config (in an empty directory, as the CLI runs it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("check-lib"))
        return check.check(config.load(None, ["train.epochs=2"]), device="cpu")


def test_store_size_estimate_is_within_a_factor_2_of_the_disk(
    done: dict[str, Any], library: tuple[pd.DataFrame, check.CheckSummary]
) -> None:
    reader: StoreReader = done["reader"]
    table, summary = library
    _, on_disk = disk_usage(reader.path)
    assert on_disk / 2 <= summary.est_store_bytes <= 2 * on_disk, (summary.est_store_bytes, on_disk)
    assert summary.raw_bytes == sum(reader.logical_bytes(p) for paths in reader.streams().values() for p in paths)
    assert table["est_mib"].notna().all()


def test_run_time_is_extrapolated_from_the_timed_passes(
    done: dict[str, Any], library: tuple[pd.DataFrame, check.CheckSummary]
) -> None:
    attrs = done["reader"].attrs
    table, summary = library
    assert (summary.total_steps, summary.steps_per_epoch) == (attrs["total_steps"], attrs["steps_per_epoch"])
    assert len(summary.step_s) == check.TIMED_STEPS
    assert all(s > 0 for s in summary.step_s)
    assert summary.est_train_s == pytest.approx(summary.total_steps * summary.step_s[-1])
    # every stream but metrics_fine (written by the step itself) has one row at step 0, whose cost repeats per row
    per_step = table.set_index("stream").drop("metrics_fine")
    assert (per_step["step0_s"] > 0).all()
    rounding = 1e-6 * (per_step["rows"].max() + 1)  # the table's seconds have 6 decimals
    assert per_step["est_s"].to_numpy() == pytest.approx(
        (per_step["step0_s"] * per_step["rows"]).to_numpy(), abs=rounding
    )
    assert table.set_index("stream").loc["metrics_fine", "est_s"] == 0
    assert summary.est_checkpoints == 1  # the last snapshot's: the run is far shorter than 30 s
    checkpoints = summary.est_checkpoints * summary.checkpoint_s
    assert summary.est_probes_s == pytest.approx(table["est_s"].sum() + checkpoints, abs=1e-5)
    assert summary.est_total_s == pytest.approx(summary.prepare_s + summary.est_train_s + summary.est_probes_s)
    stored = done["reader"].checkpoint(done["reader"].checkpoint_steps()[-1])
    assert summary.checkpoint_bytes == pytest.approx(len(stored), rel=0.05)  # both with the momentum buffers


# (id, arguments after the command): each fails before a store exists, in `record` as in `check`; the
# tiny config (tests/conftest.py) builds no digits, so the failures after torch's import come quickly
BAD = [
    ("unknown-key", ("--set", "train.nosuch=1")),
    ("missing-file", ("missing.toml",)),
    ("unknown-tensor", ("tiny.toml", "--set", 'record.params_fine.names=["nope.weight"]')),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    cwd = tmp_path_factory.mktemp("bad")
    tiny_config(cwd)
    quiet = {"record": ("--quiet",), "check": ()}  # record's progress bar would start before a model error
    jobs = {
        f"{case}/{command}": (lambda c=command, a=args: run_cli(c, *a, *quiet[c], "--device", "cpu", cwd=cwd))
        for case, args in BAD
        for command in ("record", "check")
    }
    found = {name: future.result() for name, future in concurrently(jobs).items()}
    assert sorted(p.name for p in cwd.iterdir()) == ["tiny.toml"]
    return found


@pytest.mark.parametrize(("case", "args"), BAD, ids=[case for case, _ in BAD])
def test_bad_input_fails_as_record_does(
    bad_runs: dict[str, subprocess.CompletedProcess[str]], case: str, args: tuple[str, ...]
) -> None:
    recorded, checked = bad_runs[f"{case}/record"], bad_runs[f"{case}/check"]
    assert recorded.returncode == checked.returncode == 2
    assert one_error_line(checked.stderr) == one_error_line(recorded.stderr)
    assert checked.stdout == ""


def test_discard_sink_takes_every_row_and_a_bare_recorder_still_refuses() -> None:
    cfg = config.from_dict(TINY)
    trainer, recorder, _ = run.prepare(cfg, torch.device("cpu"))
    with recorder, pytest.raises(AssertionError, match="attach a writer"):
        recorder.at_step(0, 0)  # rank 0 with nowhere to put its rows is a bug, sink or not
    trainer, recorder, _ = run.prepare(cfg, torch.device("cpu"))
    sink = DiscardSink()
    with recorder.attach(sink):
        recorder.at_step(0, 0)
        recorder.flush()
    at_zero = {s.name: s for s in recorder.streams() if s.name in sink.rows}
    assert set(at_zero) == {"metrics", "params", "params_fine", "preds", "grad", "acts"}
    assert sink.rows == dict.fromkeys(at_zero, 1)
    assert sink.nbytes == {name: check.bytes_per_row(spec) for name, spec in at_zero.items()}
    assert sink.checkpoints == 1
    assert sink.checkpoint_bytes > 0


def test_train_steps_with_a_count_stops_there_and_skips_the_scheduled_passes() -> None:
    trainer, recorder, _ = run.prepare(config.from_dict(TINY), torch.device("cpu"))
    calls: list[tuple[int, int]] = []
    recorder.at_step = lambda step, epoch: calls.append((step, epoch))  # type: ignore[method-assign]
    seen: list[int] = []

    class Steps:
        def on_step(self, info: Any) -> None:
            seen.append(info.step)

    per_epoch = trainer.timeline.steps_per_epoch
    with recorder.attach(DiscardSink()):
        trainer.train_steps(recorder, [Steps()], count=per_epoch + 1)  # across an epoch's end
    assert seen == list(range(1, per_epoch + 2))
    assert trainer.step == per_epoch + 1
    assert calls == []
