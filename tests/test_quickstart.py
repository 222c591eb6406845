"""End to end: `gentrace record` with no arguments, then `info`, plain zarr and dask reads."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from gentrace.core import config
from gentrace.store.reader import StoreReader

ROOT = Path(__file__).resolve().parents[1]
STREAMS = ["metrics", "metrics_fine", "params", "params_fine", "preds", "grad", "acts"]


def gentrace(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gentrace", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


# The README's set-up runs `.venv/bin/gentrace record` without activating the venv: the quick start is
# recorded the same way, by the venv's console script at a relative path (with a space, to test the
# quoting) that PATH does not lead to, so the hints must name the program as it was invoked.
PROGRAM = "my venv/bin/gentrace"


def _without_gentrace_on_path(script: Path) -> dict[str, str]:
    """The test environment with no PATH entry that holds this venv's `gentrace`."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    kept = [e for e in entries if e and os.path.abspath(e) != str(script.parent.absolute())]
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": os.pathsep.join(kept)}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    cwd = tmp_path_factory.mktemp("qs")
    script = Path(sys.executable).parent / "gentrace"
    assert script.is_file(), f"{script} is missing: install gentrace into this venv (pip install -e '.[test]')"
    (cwd / PROGRAM).parent.mkdir(parents=True)
    (cwd / PROGRAM).symlink_to(script)
    done = subprocess.run(
        [PROGRAM, "record"], cwd=cwd, env=_without_gentrace_on_path(script), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return cwd / done.stdout.strip(), done


def _hints(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The commands `record` printed after `next, try:` (indented by two spaces)."""
    lines = done.stderr.splitlines()
    return [line.strip() for line in lines[lines.index("next, try:") + 1 :] if line.startswith("  ")]


def test_quickstart_prints_store_and_next_commands(quickstart: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    path, done = quickstart
    assert done.stdout.strip().startswith("runs/quickstart-")
    assert done.stdout.strip().endswith(".zarr")
    assert len(done.stdout.strip().splitlines()) == 1  # stdout: the store path only
    assert f"{shlex.quote(PROGRAM)} info {done.stdout.strip()}" in done.stderr  # the program as invoked, quoted
    assert "Traceback" not in done.stderr
    assert path.is_dir()


def test_info_lists_every_stream_with_rows(quickstart: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    path, _ = quickstart
    text = gentrace("info", str(path), cwd=path.parent)
    assert text.returncode == 0, text.stderr
    reader = StoreReader(path)
    for stream in STREAMS:
        line = next(row for row in text.stdout.splitlines() if row.startswith(stream + " "))
        assert int(line.split()[1]) == reader.committed(stream) > 0
    assert "status     complete" in text.stdout
    as_json = json.loads(gentrace("info", "--json", str(path), cwd=path.parent).stdout)
    assert {s["name"]: s["rows"] for s in as_json["streams"]} == {s: reader.committed(s) for s in STREAMS}
    assert as_json["compression_ratio"] > 0
    writer = as_json["writer"]  # the writer's throughput: bytes handed over per busy second
    assert as_json["writer_mib_per_s"] == pytest.approx(writer["bytes"] / 2**20 / writer["busy_s"])
    assert as_json["writer_mib_per_cpu_s"] == pytest.approx(writer["bytes"] / 2**20 / writer["cpu_s"])
    assert writer["cpu_s"] > 0
    per_cpu = f"{writer['cpu_s']:.2f} s of CPU, {as_json['writer_mib_per_cpu_s']:.0f} MiB per CPU second"
    assert f"handed over, {as_json['writer_mib_per_s']:.0f} MiB/s; {per_cpu})" in text.stdout


def test_plain_zarr_arrays_end_at_committed(quickstart: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    path, _ = quickstart
    group = zarr.open_group(path, mode="r")
    committed = group.attrs["committed"]
    streams = group.attrs["streams"]
    cfg = config.load(None)
    expected_rows = {
        "metrics": cfg.train.epochs + 1,
        "params": cfg.train.epochs + 1,
        "preds": cfg.train.epochs + 1,
        "grad": cfg.train.epochs + 1,
        "acts": cfg.train.epochs + 1,
        "metrics_fine": group.attrs["total_steps"],
        "params_fine": group.attrs["total_steps"] + 1,
    }
    assert committed == expected_rows
    for stream, paths in streams.items():
        for array_path in paths:
            array = group[array_path]
            assert array.shape[0] == committed[stream], array_path
            values = np.asarray(array[...])
            if values.dtype.kind == "f":
                assert not np.isnan(values).any(), array_path
            else:
                assert (values != -1).all(), array_path
    assert group["params/0.weight"].shape == (cfg.train.epochs + 1, cfg.train.replicates, 128, 64)


def test_dask_reads_the_store(quickstart: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    import dask.array as da  # a test dependency (extras "test")

    path, _ = quickstart
    lazy = da.from_zarr(str(path), component="params/0.weight")
    assert np.array_equal(lazy[-1].compute(), StoreReader(path).array("params/0.weight")[-1])


def test_training_learns_digits(quickstart: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    reader = StoreReader(quickstart[0])
    test_acc = reader.array("metrics/test_acc")
    assert test_acc[0].max() < 0.3  # chance level at initialization
    assert test_acc[-1].min() > 0.9  # every replicate learns the digits
    preds = reader.array("preds/test")[-1]
    labels = reader.array("data/labels_test")
    assert np.allclose((preds == labels).mean(axis=1), test_acc[-1], atol=1e-6)


def test_sample_quickstart_file_is_the_builtin() -> None:
    assert (ROOT / "sample_configs" / "quickstart.toml").read_text() == config.QUICKSTART_TOML


def test_quickstart_feeds_every_analysis_it_records(quickstart: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    import io

    import pandas as pd

    path, _ = quickstart
    done = gentrace("analyze", "gsnr", str(path), cwd=path.parent)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(io.StringIO(done.stdout))
    expected = ["step", "epoch", "replicate", "gsnr_mean", "gsnr_median", "same_sign", "n", "zero_variance"]
    assert list(table.columns) == expected
    assert len(table) == 2 * (config.load(None).train.epochs + 1)
    by_layer = pd.read_csv(io.StringIO(gentrace("analyze", "gsnr", str(path), "--by", "layer", cwd=path.parent).stdout))
    assert set(by_layer.layer) == set(StoreReader(path).grad_tensor_names())
    osgr = gentrace("analyze", "osgr", str(path), cwd=path.parent)
    assert osgr.returncode == 2  # metrics once per epoch: the message names record.eval_every_steps
    assert "record.eval_every_steps" in osgr.stderr


def test_every_printed_hint_runs_as_printed(quickstart: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Each hint, split as a shell would split it, runs where `record` ran, gentrace not on PATH."""
    path, done = quickstart
    hints = [shlex.split(line) for line in _hints(done)]
    venv_python = [argv for argv in hints if Path(argv[0]).parent == Path(sys.executable).parent]
    assert [argv[0] for argv in hints if argv not in venv_python] == [PROGRAM] * (len(hints) - 1)  # as invoked
    assert [argv[1] for argv in venv_python] == ["-c"]  # python by the venv's path (PATH finds another one)
    analyses = {argv[2] for argv in hints if argv[0] == PROGRAM and argv[1] == "analyze"}
    assert {"gsnr", "paths", "trajectory", "lipschitz", "mi"} <= analyses
    assert {argv[1] for argv in hints if argv[0] == PROGRAM} == {"info", "analyze", "plot"}
    env = _without_gentrace_on_path(Path(sys.executable).parent / "gentrace")
    for argv in hints:
        result = subprocess.run(argv, cwd=path.parent.parent, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (argv, result.stderr)
        assert result.stdout.strip(), argv
        if argv[1] == "analyze":
            assert result.stdout.count("\n") >= 2, argv  # a header and at least one row
        if argv[1] == "plot":  # the figure written is the one line on stdout
            assert result.stdout == f"{argv[argv.index('-o') + 1]}\n"
            assert (path.parent.parent / result.stdout.strip()).stat().st_size > 1000
