"""gentrace sweep: grid parsing, one store per point, resumable reruns, bad grids before anything runs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from gentrace.cli.app import app
from gentrace.core.errors import ConfigError
from gentrace.store.reader import StoreReader
from gentrace.training import sweep

FAST = {
    "train": {"epochs": 1},
    "record": {
        "checkpoint_every_s": 0,
        "grad_moments": {"every_epochs": 0},
        "activations": {"every_epochs": 0},
        "predictions": {"every_epochs": 0},
    },
}

GRIDS = [
    pytest.param(["data.seed=0..2"], [("data.seed", [0, 1, 2])], id="range"),
    pytest.param(
        ["train.lr=0.1,0.2", "model.hidden=[4]"], [("train.lr", [0.1, 0.2]), ("model.hidden", [[4]])], id="toml"
    ),
    pytest.param(['data.name="cos2d",sinusoid'], [("data.name", ["cos2d", "sinusoid"])], id="strings"),
]


@pytest.mark.parametrize(("items", "want"), GRIDS)
def test_parse_grid(items: list[str], want: list[tuple[str, list[object]]]) -> None:
    assert sweep.parse_grid(items) == want


@pytest.mark.parametrize("items", [["data.seed"], ["data.seed=3..1"], ["data.seed=1", "data.seed=2"]])
def test_parse_grid_rejects(items: list[str]) -> None:
    with pytest.raises(ConfigError, match="--grid"):
        sweep.parse_grid(items)


def test_points_and_names() -> None:
    grid = sweep.parse_grid(["data.freq=0.25,1.0", "data.seed=0..1", 'name="a/b c"'])
    names = [sweep.point_name(point) for point in sweep.points(grid)]
    assert names[:2] == ["data.freq=0.25,data.seed=0,name=a_b_c.zarr", "data.freq=0.25,data.seed=1,name=a_b_c.zarr"]
    assert len(set(names)) == 4


def test_sweep_end_to_end_and_rerun_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, **FAST)
    out = tmp_path / "sweep"
    args = ["sweep", str(cfg), "--grid", "train.lr=0.05,0.1", "--out", str(out), "--device", "cpu"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == f"{out}\n"  # the sweep directory is the one line on stdout; the rest went to stderr
    manifest = json.loads((out / sweep.MANIFEST).read_text())
    stores = [out / entry["store"] for entry in manifest["points"]]
    assert [entry["values"] for entry in manifest["points"]] == [{"train.lr": 0.05}, {"train.lr": 0.1}]
    assert all(entry["status"] == "complete" for entry in manifest["points"])
    assert [StoreReader(p).config["train"]["lr"] for p in stores] == [0.05, 0.1]
    mtimes = [(p / "zarr.json").stat().st_mtime_ns for p in stores]

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("complete, skipped") == 2
    assert [(p / "zarr.json").stat().st_mtime_ns for p in stores] == mtimes

    table = CliRunner().invoke(app, ["analyze", "trajectory", str(out)])
    assert table.exit_code == 0, table.output
    header = table.stdout.splitlines()[0].split(",")
    assert header[:3] == ["store", "train.lr", "replicate"]

    # the hints name the sweep directory and what its stores can answer, and each runs as printed
    lines = first.stderr.splitlines()
    hints = [shlex.split(line) for line in lines[lines.index(next(x for x in lines if "next, try:" in x)) + 1 :]]
    commands = [words[words.index(next(w for w in words if w in ("analyze", "plot"))) :] for words in hints]
    assert ("analyze", "trajectory") in {tuple(c[:2]) for c in commands}
    monkeypatch.chdir(tmp_path)  # plot hints write their figure into the current directory
    for command in commands:
        assert str(out) in command, command
        done = CliRunner().invoke(app, command)
        assert done.exit_code == 0, (command, done.output)
        assert done.stdout.strip(), command


def test_resume_of_an_interrupted_point(tmp_path: Path) -> None:
    """A store left `interrupted` is continued with resume=True and ends complete."""
    from gentrace.core import config
    from gentrace.training import run

    cfg_path = tiny_config(tmp_path, **FAST)
    out = tmp_path / "sweep"
    grid = sweep.parse_grid(["train.lr=0.05"])
    path = out / sweep.point_name({"train.lr": 0.05})
    out.mkdir()
    cfg = config.load(cfg_path, ["train.lr=0.05"])

    class Stop:
        def on_step(self, info: object) -> None:
            if getattr(info, "step", 0) == 2:
                raise KeyboardInterrupt

    with pytest.raises(run.Interrupted):
        run.record(cfg, path, device="cpu", observers=[Stop()])
    assert StoreReader(path).status == "interrupted"
    said: list[str] = []
    sweep.record_sweep(cfg_path, grid, out, device="cpu", say=said.append)
    assert "resuming" in said[0]
    assert StoreReader(path).status == "complete"


@pytest.mark.parametrize("item", ["data.nope=1,2", "train.lr=-1,0.1", "data.seed=a..b"])
def test_bad_grid_exits_2_before_recording(tmp_path: Path, item: str) -> None:
    cfg = tiny_config(tmp_path, **FAST)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", str(cfg), "--grid", item, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert item.split("=")[0] in result.output
    assert not out.exists()
