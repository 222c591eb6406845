"""Progress display: fits 80 columns with elapsed and ETA whole, names the preparation phases, plain lines off a TTY."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from conftest import StopAt, run_cli, tiny_config, wait_until
from rich.console import Console

from gentrace.cli.progress import IMPORTING_TORCH, CountProgress, TrainingProgress, hms, preparing
from gentrace.core import config
from gentrace.record.base import StepInfo
from gentrace.training import run


class Clock:
    """A clock the test moves by hand: no test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def terminal(width: int) -> Console:
    return Console(width=width, force_terminal=True, record=True, file=io.StringIO(), color_system="standard")


def shown(console: Console, renderable: object) -> str:
    """What `renderable` looks like on `console`, ANSI codes removed."""
    console.print(renderable)
    return console.export_text(clear=True).rstrip("\n")


def step(n: int, steps_per_epoch: int, loss: float = 0.5123, err: float = 0.125) -> StepInfo:
    return StepInfo(n, (n - 1) // steps_per_epoch, 0.1, [loss], [err], 32)


def test_hms_never_abbreviates() -> None:
    assert [hms(s) for s in (0, 4.9, 61, 3599, 3600, 45296, 360000)] == [
        "0:00:00",
        "0:00:04",
        "0:01:01",
        "0:59:59",
        "1:00:00",
        "12:34:56",
        "100:00:00",
    ]


@pytest.mark.parametrize("width", [80, 60, 40])
def test_training_line_fits_width_with_elapsed_and_eta_whole(width: int) -> None:
    clock = Clock()
    console = terminal(width)
    progress = TrainingProgress(console=console, clock=clock)
    progress.plan(total_steps=64_000, epochs=100, samples_per_step=1024)
    progress.on_phase("step 0 probes")
    clock.now += 12.0
    before = shown(console, progress.line)
    assert before.startswith("step 0 probes") or width < 43  # the phase goes before the times do
    assert "elapsed 0:00:12" in before
    assert "eta -:--:--" in before
    for n in range(1, 12_801):  # 20 epochs of 640 steps, 4 steps a second after the first
        clock.now += 0.25
        progress.on_step(step(n, 640))
    text = shown(console, progress.line)
    assert "…" not in text
    assert len(text) <= width
    assert "elapsed 0:53:32" in text  # 12 s + 12800 * 0.25 s
    assert "eta 3:33:20" in text  # 51200 steps left at 4 per second
    if width == 80:  # what the narrower widths drop first: samples/s, the batch error, the bar
        assert text.startswith("epoch 20/100  ")
        assert "step 12800/64000" in text
        assert "loss 0.5123" in text
        assert "samples/s" not in text


def test_wide_terminal_shows_every_field() -> None:
    clock = Clock()
    console = terminal(160)
    progress = TrainingProgress(console=console, clock=clock)
    progress.plan(total_steps=20, epochs=4, samples_per_step=40)
    for n in range(1, 11):
        clock.now += 0.5
        progress.on_step(step(n, 5))
    text = shown(console, progress.line)
    assert re.fullmatch(
        r"epoch 2/4  ━+  step 10/20  loss 0\.5123  err 0\.125  80 samples/s  elapsed 0:00:05  eta 0:00:05", text
    ), text


def test_live_display_on_a_terminal_ends_on_the_finished_run() -> None:
    clock = Clock()
    console = terminal(80)
    progress = TrainingProgress(console=console, clock=clock)
    progress.plan(total_steps=10, epochs=2, samples_per_step=8)
    with progress:
        progress.on_phase("creating store")
        for n in range(1, 11):
            clock.now += 1.0
            progress.on_step(step(n, 5))
        progress.on_phase("closing store")
    last = console.export_text().rstrip("\n").splitlines()[-1]
    assert last.startswith("epoch 2/2  ")
    assert "step 10/10" in last
    assert "elapsed 0:00:10" in last
    assert "eta 0:00:00" in last


def test_plain_lines_per_phase_per_epoch_and_every_s_without_ansi() -> None:
    clock = Clock()
    out = io.StringIO()
    progress = TrainingProgress(console=Console(file=out), every_s=30.0, clock=clock)  # a StringIO: no terminal
    progress.plan(total_steps=300, epochs=3, samples_per_step=10)
    with progress:
        progress.on_phase("loading data")
        clock.now += 2.0
        for n in range(1, 301):
            clock.now += 0.5 if n <= 100 else 0.125  # epoch 1 takes 50 s: a line within it, 30 s after the last
            progress.on_step(step(n, 100))
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert lines[0] == "loading data  elapsed 0:00:00"
    assert [line.split("  ")[:2] for line in lines[1:]] == [
        ["epoch 1/3", "step 61/300"],  # 30 s after the phase line, written at step 1
        ["epoch 1/3", "step 100/300"],
        ["epoch 2/3", "step 200/300"],
        ["epoch 3/3", "step 300/300"],
    ]
    assert lines[2] == "epoch 1/3  step 100/300  loss 0.5123  err 0.125  20 samples/s  elapsed 0:00:52  eta 0:01:40"
    assert lines[-1].endswith("elapsed 0:01:17  eta 0:00:00")  # 2 + 50 + 200 * 0.125 s


def test_count_progress_fits_and_prints_plain_lines() -> None:
    clock = Clock()
    console = terminal(80)
    bar = CountProgress("compacting", 4000, console=console, clock=clock)
    for _ in range(1000):
        clock.now += 1 / 64  # exact in binary: the sum is 15.625 s, not a hair below
        bar.advance("some/array")
    text = shown(console, bar.line)
    assert re.fullmatch(r"compacting  ━+  1000/4000 arrays  elapsed 0:00:15  eta 0:00:46", text), text
    assert len(text) <= 80

    out = io.StringIO()
    plain = CountProgress("verifying", 100, console=Console(file=out), every_s=30.0, clock=clock)
    with plain:
        for _ in range(100):
            clock.now += 1.0
            plain.advance()
    assert out.getvalue().splitlines() == [  # none at the start: a quick verify prints only its table
        "verifying  30/100 arrays  elapsed 0:00:30  eta 0:01:10",
        "verifying  60/100 arrays  elapsed 0:01:00  eta 0:00:40",
        "verifying  90/100 arrays  elapsed 0:01:30  eta 0:00:10",
    ]

    quiet = io.StringIO()
    with CountProgress("verifying", 100, quiet=True, console=Console(file=quiet), clock=clock) as silent:
        silent.advance()
    assert quiet.getvalue() == ""


def test_plain_phase_line_waits_for_the_next_event_and_an_error_drops_it() -> None:
    out = io.StringIO()
    progress = TrainingProgress(console=Console(file=out), phase_line_s=600.0)
    seen: list[list[str]] = []

    def prepare() -> None:
        with progress:
            progress.on_phase("loading data")
            seen.append(out.getvalue().splitlines())  # none yet: a bad input may end this phase at once
            progress.on_phase("building models")
            seen.append(out.getvalue().splitlines())
            raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        prepare()
    assert seen == [[], ["loading data  elapsed 0:00:00"]]
    assert out.getvalue().splitlines() == ["loading data  elapsed 0:00:00"]  # the error line says the rest

    with pytest.raises(ValueError, match="bad input"), preparing(progress, IMPORTING_TORCH):
        raise ValueError("bad input")
    assert out.getvalue().splitlines() == ["loading data  elapsed 0:00:00"]


def test_plain_phase_line_is_written_once_the_phase_lasts() -> None:
    out = io.StringIO()
    progress = TrainingProgress(console=Console(file=out), phase_line_s=0.0)
    with progress:
        progress.on_phase("loading data")
        wait_until(lambda: out.getvalue() != "")  # the phase's timer writes it, with no further event
        assert out.getvalue() == "loading data  elapsed 0:00:00\n"


class Events:
    """Phases and steps, in the order `run.record` reports them."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def phase(self, name: str) -> None:
        self.seen.append(name)

    def on_step(self, info: StepInfo) -> None:
        self.seen.append(f"step {info.step}")


def test_record_reports_phases_in_order(tmp_path: Path) -> None:
    cfg = config.load(tiny_config(tmp_path), [])
    events = Events()
    run.record(cfg, tmp_path / "s.zarr", device="cpu", observers=[events], phase=events.phase)
    steps = [f"step {n}" for n in range(1, 21)]
    assert events.seen == [
        run.LOADING_DATA,
        run.BUILDING_MODELS,
        run.CREATING_STORE,
        run.STEP0_PROBES,
        *steps,
        run.CLOSING_STORE,
    ]


def test_resume_reports_its_phases_in_order(tmp_path: Path) -> None:
    cfg = config.load(tiny_config(tmp_path), [])
    store = tmp_path / "s.zarr"
    with pytest.raises(run.Interrupted):
        run.record(cfg, store, device="cpu", observers=[StopAt(12)])
    events = Events()
    run.record(None, store, device="cpu", resume=True, observers=[events], phase=events.phase)
    before = [run.READING_STORE, run.LOADING_DATA, run.BUILDING_MODELS, run.RESTORING_CHECKPOINT, run.REOPENING_STORE]
    assert events.seen[:5] == before
    assert events.seen[5:] == [*(f"step {n}" for n in range(11, 21)), run.CLOSING_STORE]  # from step 10's checkpoint


def test_record_off_a_tty_prints_phases_then_one_plain_line_per_epoch(tmp_path: Path) -> None:
    done = run_cli("record", tiny_config(tmp_path), "--out", tmp_path / "s.zarr", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr
    lines = done.stderr.splitlines()
    epochs = [i for i, line in enumerate(lines) if line.startswith("epoch ")]
    assert [lines[i].split("  ")[:2] for i in epochs] == [[f"epoch {e}/4", f"step {5 * e}/20"] for e in range(1, 5)]
    for i in epochs:
        assert re.search(r"  elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$", lines[i]), lines[i]
    phases = [IMPORTING_TORCH, run.LOADING_DATA, run.BUILDING_MODELS, run.CREATING_STORE, run.STEP0_PROBES]
    assert [line.split("  ")[0] for line in lines[: epochs[0]]] == phases
    assert lines[epochs[-1] + 1].startswith(f"{run.CLOSING_STORE}  elapsed ")
    assert lines[epochs[-1] + 2] == f"store written: {tmp_path / 's.zarr'}"


def test_record_quiet_prints_no_progress(tmp_path: Path) -> None:
    done = run_cli("record", tiny_config(tmp_path), "--out", tmp_path / "s.zarr", "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.strip() == str(tmp_path / "s.zarr")
