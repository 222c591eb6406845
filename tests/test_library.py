"""`import gentrace`: the library face (gentrace.open, analyze, record, Run) on the command line's own paths.

`gentrace.analyze(store, NAME, **options)` gives the rows `gentrace analyze NAME STORE --OPTION ...`
prints (same registry entry, defaults and parsing), `gentrace.record_run` writes the store
`gentrace record` writes, and `import gentrace` loads none of torch, pandas, zarr or numpy.
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, tiny_config
from typer.testing import CliRunner

import gentrace
from gentrace.analyses import registry
from gentrace.cli.app import app
from gentrace.core import config
from gentrace.core.errors import AnalysisInputError, ConfigError
from gentrace.store.reader import StoreReader


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TINY run, 2 replicates, per-step metrics (so osgr answers), recorded by `gentrace.record_run`."""
    tmp = tmp_path_factory.mktemp("library")
    out = gentrace.record_run(
        tiny_config(tmp), tmp / "tiny.zarr", overrides={"train.replicates": 2, "record.eval_every_steps": 1}
    )
    assert out == tmp / "tiny.zarr"
    return out


def test_import_gentrace_is_light() -> None:
    heavy = ("torch", "pandas", "zarr", "numpy", "typer")
    code = f"import sys, gentrace; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves() -> None:
    assert set(gentrace.__all__) == {
        "GentraceError",
        "Run",
        "StoreReader",
        "__version__",
        "analyze",
        "open",
        "record_run",
    }
    for name in gentrace.__all__:
        assert getattr(gentrace, name) is not None
    assert gentrace.StoreReader is StoreReader
    from gentrace.store import StoreReader as from_store  # the spelling a reader of the README tries first

    assert from_store is StoreReader
    importlib.import_module("gentrace.record.params")  # binds the probes' package on gentrace.record: no clash

    assert callable(gentrace.record_run)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = gentrace.nope  # type: ignore[attr-defined]


def test_record_writes_the_config_with_its_overrides(store: Path) -> None:
    reader = gentrace.open(store)
    assert isinstance(reader, StoreReader)
    assert reader.status == "complete"
    assert reader.config["train"]["replicates"] == 2
    assert reader.config["record"]["eval_every_steps"] == 1
    assert reader.config["train"]["epochs"] == TINY["train"]["epochs"]


@pytest.mark.parametrize(
    ("name", "options", "argv"),
    [
        ("gsnr", {}, []),
        ("gsnr", {"by": "layer", "replicate": 1}, ["--by", "layer", "--replicate", "1"]),
        ("gsnr", {"replicate": "0"}, ["--replicate", "0"]),
        ("osgr", {"summary": True}, ["--summary"]),
        ("trajectory", {"by": "epoch"}, ["--by", "epoch"]),
        ("lipschitz", {"where": "train", "quantiles": (0.5, 1.0)}, ["--where", "train", "--quantiles", "0.5,1.0"]),
        ("lipschitz", {"where": "test", "quantiles": "0.9"}, ["--where", "test", "--quantiles", "0.9"]),
        ("paths", {"kind": "self"}, ["--kind", "self"]),
        ("mi", {"reference": "null"}, ["--reference", "null"]),
    ],
)
def test_analyze_gives_the_rows_the_command_line_prints(
    store: Path, name: str, options: dict[str, object], argv: list[str]
) -> None:
    table = gentrace.analyze(store, name, **options)
    done = CliRunner().invoke(app, ["analyze", name, str(store), *argv])
    assert done.exit_code == 0, done.output
    printed = pd.read_csv(io.StringIO(done.stdout))
    assert len(table) > 0
    assert list(table.columns) == list(printed.columns)
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(table.to_csv(index=False))), printed)


def test_analyze_takes_paths_readers_and_lists(store: Path) -> None:
    one = gentrace.analyze(gentrace.open(store), "gsnr")
    pd.testing.assert_frame_equal(gentrace.analyze(str(store), "gsnr"), one)
    both = gentrace.analyze([store, gentrace.open(store)], "gsnr")
    assert list(both.columns[:1]) == ["store"]
    assert len(both) == 2 * len(one)


def test_analyze_passes_the_module_keywords(store: Path) -> None:
    everything = gentrace.analyze(store, "gsnr", by="layer", rtol=1.0)  # rho^2 <= sumsq / n always holds
    strict = gentrace.analyze(store, "gsnr", by="layer")
    assert (strict["zero_variance"] == 0).all()
    assert (everything["zero_variance"] > 0).all()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("gsrn", {}, "no analysis 'gsrn'; choose one of: gsnr, osgr, paths, mi, trajectory, lipschitz"),
        ("gsnr", {"bogus": 1}, "analysis gsnr has no option 'bogus'; its options are: by, replicate, rtol"),
        ("gsnr", {"by": "tensor"}, "analysis gsnr, option by: 'tensor' is not one of model, layer, param"),
        ("gsnr", {"replicate": "x"}, "analysis gsnr, option replicate: give a replicate number"),
        ("lipschitz", {"quantiles": "a,b"}, "--quantiles 'a,b': expected numbers"),
    ],
)
def test_analyze_refuses_bad_names_and_values(store: Path, name: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(AnalysisInputError) as caught:
        gentrace.analyze(store, name, **options)
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, gentrace.GentraceError)


def test_registry_values_fill_defaults_and_parse_strings_only() -> None:
    entry = registry.REGISTRY["lipschitz"]
    assert registry.values(entry.options, {}) == {
        "where": "all",
        "quantiles": (0.1, 0.5, 0.9, 1.0),
        "jacobian": False,
        "device": None,
    }
    assert registry.values(entry.options, {"quantiles": [0.5]})["quantiles"] == [0.5]
    gsnr = registry.REGISTRY["gsnr"]
    assert registry.values(gsnr.options, {"replicate": None}) == {"by": "model", "replicate": None}
    with pytest.raises(registry.BadOptionValue) as caught:
        registry.values(gsnr.options, {"by": "x"})
    assert caught.value.option == "by"


def test_record_refuses_overrides_of_a_run_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not to a RunConfig"):
        gentrace.record_run(config.load(None), tmp_path / "x.zarr", overrides=["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        gentrace.record_run(None, tmp_path / "x.zarr", overrides={"train.lrr": 0.1})
    assert not (tmp_path / "x.zarr").exists()


def test_toml_value_round_trips_overrides() -> None:
    for value in (0.1, 3, True, "a b", [1, 2], (256, 256), {"every_epochs": 5, "factor": 0.5}):
        parts, parsed = config.parse_override(f"k={config.toml_value(value)}")
        assert parts == ["k"]
        assert parsed == (list(value) if isinstance(value, tuple) else value)
