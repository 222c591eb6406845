"""The analyses' registry (gentrace.analyses.registry) and the commands built from it.

Every entry has its `analyze NAME` and `plot NAME` command with the entry's help and options, its
choice lists are the analysis modules' own, and its options are keywords of the functions it calls.
A trial analysis, one module and one entry, becomes a working command and a post-record suggestion.
"""

from __future__ import annotations

import importlib
import inspect
import io
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from gentrace.analyses import ANALYSES, REGISTRY, registry
from gentrace.cli.analyze import analyze_app, build, plot_app
from gentrace.cli.app import suggestions
from gentrace.reporting import plots
from gentrace.store import schema
from gentrace.store.reader import StoreReader

TRIAL_MODULE = '''
"""A user's analysis: the recorded steps, scaled."""

import pandas as pd

from gentrace.store import schema


def run(reader, times=1, kind="a", negate=False):
    """One row per recorded metrics step."""
    steps = reader.array(schema.METRICS.step).astype("int64") * times
    return pd.DataFrame({"step": -steps if negate else steps, "kind": kind})
'''


def _trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **changes: Any) -> registry.Analysis:
    """An analysis outside the package: its module on sys.path, its entry (not yet registered)."""
    (tmp_path / "trial_analysis.py").write_text(TRIAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "trial_analysis", raising=False)
    entry = registry.Analysis(
        "trial",
        "trial_analysis",
        "Recorded steps, scaled: a trial analysis.",
        (
            registry.Option("times", "Scale the steps.", 1, int, min=1),
            registry.Option("kind", "A label for the rows.", "a", choices=("a", "b")),
            registry.Option("negate", "Negate the steps.", False, bool),
        ),
        streams=(schema.METRICS,),
        suggest=("gentrace analyze trial {path} --kind b",),
        plot=registry.Plot("plot_trial", "Draw the trial.", (registry.Option("kind", "Which label.", "a"),)),
    )
    return replace(entry, **changes)


def _command_params(app: Any, name: str) -> dict[str, Any]:
    command = get_command(app).commands[name]  # type: ignore[attr-defined]
    return {param.name: param for param in command.params}


def _check_options(params: dict[str, Any], options: tuple[registry.Option, ...]) -> None:
    for option in options:
        param = params[option.name]
        assert param.opts == [f"--{option.name}"]
        assert param.help == option.help
        default = param.default.value if isinstance(param.default, Enum) else param.default
        assert default == option.default
        if option.choices:
            assert [choice.value for choice in param.type_descriptor.annotation] == list(option.choices)
        if option.type is bool:
            assert param.is_flag
            assert not param.secondary_opts  # --summary, no --no-summary


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_entry_has_its_analyze_command(name: str) -> None:
    entry = REGISTRY[name]
    command = get_command(analyze_app).commands[name]  # type: ignore[attr-defined]
    assert command.help == entry.help
    params = _command_params(analyze_app, name)
    names = ["stores", *(option.name for option in entry.options), "fmt", "out", *(["dask"] if entry.plan else [])]
    assert list(params) == names
    _check_options(params, entry.options)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_entry_has_its_plot_command(name: str) -> None:
    entry = REGISTRY[name]
    assert entry.plot is not None
    command = get_command(plot_app).commands[name]  # type: ignore[attr-defined]
    assert command.help == entry.plot.help
    params = _command_params(plot_app, name)
    assert list(params) == ["stores", "out", *(option.name for option in entry.plot.options)]
    _check_options(params, entry.plot.options)


def test_commands_are_listed_in_registry_order() -> None:
    assert list(get_command(analyze_app).commands) == list(REGISTRY)  # type: ignore[attr-defined]
    assert list(get_command(plot_app).commands) == [n for n, e in REGISTRY.items() if e.plot]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_entry_matches_its_module_and_plot(name: str) -> None:
    """The options are keywords of what the entry calls; ANALYSES[name] is the module's run."""
    entry = REGISTRY[name]
    module = importlib.import_module(entry.module)
    assert ANALYSES[name] is module.run
    called = [getattr(module, entry.table)] + ([module.plan] if entry.plan else [])
    for function in called:
        keywords = inspect.signature(function).parameters
        assert {option.name for option in entry.options} <= set(keywords)
        assert ("parts" in keywords) == (entry.plan_parts and function is getattr(module, "plan", None))
    assert entry.plot is not None
    drawn = inspect.signature(getattr(plots, entry.plot.function)).parameters
    assert {option.name for option in entry.plot.options} <= set(drawn)


def test_choice_lists_are_the_modules_own() -> None:
    from gentrace.analyses import gsnr, information, lipschitz, mi_references, paths, trajectory

    assert registry.GSNR_BY == gsnr.BY
    assert registry.PATH_KINDS == paths.KINDS
    assert registry.MI_SPLITS == information.SPLITS
    assert registry.TRAJECTORY_BY == trajectory.BY
    assert registry.LIPSCHITZ_WHERE == lipschitz.WHERE
    assert set(registry.MI_REFERENCES) == {*mi_references.REFERENCES, "null"}


def test_a_trial_entry_becomes_commands_that_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_store: Path
) -> None:
    drawn: list[tuple[int, Path, dict[str, Any]]] = []

    def plot_trial(readers: list[StoreReader], out: Path, **options: Any) -> Path:
        drawn.append((len(readers), out, options))
        out.write_bytes(b"")
        return out

    monkeypatch.setattr(plots, "plot_trial", plot_trial, raising=False)
    analyze, plot = build({**REGISTRY, "trial": _trial(tmp_path, monkeypatch)})
    runner = CliRunner()

    shown = runner.invoke(analyze, ["--help"])
    assert shown.exit_code == 0
    assert "trial" in shown.output
    assert "Recorded steps, scaled: a trial analysis." in shown.output
    done = runner.invoke(analyze, ["trial", str(reference_store), "--times", "3", "--kind", "b", "--negate"])
    assert done.exit_code == 0, done.output
    table = pd.read_csv(io.StringIO(done.output))
    steps = StoreReader(reference_store).array(schema.METRICS.step).astype("int64")
    assert list(table.step) == list(-3 * steps)
    assert set(table.kind) == {"b"}
    bad = runner.invoke(analyze, ["trial", str(reference_store), "--kind", "c"])
    assert bad.exit_code == 2
    assert runner.invoke(analyze, ["trial", str(reference_store), "--dask", "local"]).exit_code == 2  # no plan

    figure = tmp_path / "trial.png"
    done = runner.invoke(plot, ["trial", str(reference_store), str(reference_store), "-o", str(figure), "--kind", "x"])
    assert done.exit_code == 0, done.output
    assert drawn == [(2, figure, {"kind": "x"})]


def test_a_trial_entry_without_a_plot_function_draws_its_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_store: Path
) -> None:
    """Module + entry alone give a figure: `Plot.of_columns` draws the analysis' own table (no plots.py edit)."""
    trial = _trial(tmp_path, monkeypatch, plot=registry.Plot.of_columns("Draw the scaled steps.", ("step_x2",)))
    (tmp_path / "trial_analysis.py").write_text(
        "import pandas as pd\nfrom gentrace.store import schema\n\n\n"
        "def run(reader, times=1, kind='a', negate=False):\n"
        "    steps = reader.array(schema.METRICS.step).astype('int64')\n"
        "    return pd.DataFrame({'step': steps, 'step_x2': 2 * steps})\n"
    )
    _, plot = build({**REGISTRY, "trial": trial})
    figure = tmp_path / "columns.png"
    done = CliRunner().invoke(plot, ["trial", str(reference_store), "-o", str(figure)])
    assert done.exit_code == 0, done.output
    from PIL import Image

    with Image.open(figure) as image:
        assert image.size == (int(5.0 * plots.DPI), int(4.0 * plots.DPI))  # one panel
    no_column = replace(trial, plot=registry.Plot.of_columns("Draw a column that is not there.", ("nope",)))
    _, plot = build({**REGISTRY, "trial": no_column})
    done = CliRunner().invoke(plot, ["trial", str(reference_store), "-o", str(figure)])
    assert done.exit_code == 2
    assert "has no column 'nope'" in done.output


def test_an_option_parse_error_is_a_usage_error_naming_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_store: Path
) -> None:
    entry = _trial(tmp_path, monkeypatch)
    picky = replace(entry, options=(registry.Option("kind", "A label.", "a", parse=registry.replicate),))
    analyze, _ = build({"trial": picky})
    done = CliRunner().invoke(analyze, ["trial", str(reference_store), "--kind", "x"], standalone_mode=False)
    assert isinstance(done.exception, typer.BadParameter)  # what main() turns into one `error:` line, exit 2
    message = "Invalid value for --kind: give a replicate number (0, 1, ...) or 'all', not 'x'"
    assert done.exception.format_message() == message


def test_an_option_may_not_shadow_the_commands_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _trial(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="clash"):
        build({"trial": replace(entry, options=(registry.Option("out", "Where.", None, str | None),))})


def test_suggestions_come_from_the_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_store: Path
) -> None:
    reader = StoreReader(reference_store)
    path = reader.path
    before = suggestions(reader)
    assert before == [
        f"gentrace analyze gsnr {path}",
        f"gentrace analyze gsnr {path} --by layer --format table",
        f"gentrace plot gsnr {path} -o gsnr.png",
        f"gentrace analyze paths {path} --kind self",
        f"gentrace analyze trajectory {path}",
        f"gentrace analyze lipschitz {path} --where train",
        f"gentrace analyze mi {path} --summary",
        f"""python -c 'import zarr; print(zarr.open_group("{path}", mode="r").tree())'""",
    ]
    trial = _trial(tmp_path, monkeypatch)
    monkeypatch.setitem(REGISTRY, "trial", trial)
    assert suggestions(reader) == [*before[:-1], f"gentrace analyze trial {path} --kind b", before[-1]]
    monkeypatch.setitem(REGISTRY, "trial", replace(trial, suggest_if=lambda _: False))
    assert suggestions(reader) == before
    missing = [stream for stream in schema.STREAMS.values() if not reader.has(stream.name)]
    if missing:  # a stream the store lacks: no suggestion
        monkeypatch.setitem(REGISTRY, "trial", replace(trial, streams=(schema.METRICS, missing[0])))
        assert suggestions(reader) == before
