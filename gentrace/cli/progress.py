"""Progress of `gentrace record` and `gentrace compact`/`verify`, on stderr so stdout stays data only.

On a terminal: one live line, fitted to the console's width by dropping the least useful fields first
(samples/s, then the batch error, then the bar), so that elapsed time and ETA are always shown whole.
Before the first step the line names the preparation phase under way (run.LOADING_DATA, ...).

Anywhere else (a CI log, `nohup`, a SLURM output file): plain lines without ANSI codes, one per phase,
one per finished epoch and one every `every_s` seconds within a long epoch, e.g.
`epoch 3/20  step 96/640  loss 0.5120  err 0.125  1,234 samples/s  elapsed 0:00:04  eta 0:00:21`.
A phase's line (`loading data  elapsed 0:00:02`, the time it began) is written when the next phase or
step comes, or once it has lasted PHASE_LINE_S: a phase that a bad input ends at once leaves no line,
so the error stays the only line on stderr. Likewise `compact`/`verify` write a line every `every_s`
seconds and none at all when they take less.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Self

from rich.console import Console, ConsoleOptions
from rich.live import Live
from rich.text import Text

if TYPE_CHECKING:  # gentrace.record imports torch, which the first phase shown is the import of
    from gentrace.record.base import StepInfo

GAP = "  "
BAR_MIN, BAR_MAX = 10, 40
EVERY_S = 30.0  # plain mode: the longest silence within an epoch
PHASE_LINE_S = 5.0  # plain mode: a phase still under way after this long gets its line at once
IMPORTING_TORCH = "importing torch"  # `record`'s first phase, before gentrace.training.run can report its own


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS (0:00:04, 12:03:59): never cut, whatever the width."""
    s = max(int(seconds), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def fit(fields: dict[str, str], order: list[str], priority: list[str], width: int) -> tuple[list[str], int]:
    """The fields (in display `order`) that fit in `width` columns, kept in `priority` order; and the bar's width.

    `fields` maps a name to its text; the name "bar" (not in `fields`) is the bar, which takes what the
    kept text leaves (BAR_MIN..BAR_MAX columns) or is dropped. Fields are joined by GAP.
    """
    kept: list[str] = []
    used = 0
    for name in priority:
        need = BAR_MIN if name == "bar" else len(fields[name])
        extra = need + (len(GAP) if kept else 0)
        if used + extra <= width:
            kept.append(name)
            used += extra
    bar = min(BAR_MAX, BAR_MIN + width - used) if "bar" in kept else 0
    return [name for name in order if name in kept], bar


def _bar(width: int, fraction: float, ascii_only: bool) -> Text:
    done = round(width * min(max(fraction, 0.0), 1.0))
    char = "-" if ascii_only else "━"
    style = "bar.finished" if fraction >= 1 else "bar.complete"
    return Text.assemble((char * done, style), (char * (width - done), "bar.back"))


class _Line:
    """A renderable that asks `fields()` for the current texts and draws the ones that fit the console."""

    def __init__(
        self,
        fields: Callable[[], tuple[dict[str, str], float | None]],
        order: list[str],
        priority: list[str],
    ) -> None:
        self.fields, self.order, self.priority = fields, order, priority

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        texts, fraction = self.fields()
        priority = [name for name in self.priority if name in texts or (name == "bar" and fraction is not None)]
        shown, bar_width = fit(texts, [n for n in self.order if n in priority], priority, options.max_width)
        line = Text(no_wrap=True, overflow="crop")
        for i, name in enumerate(shown):
            if i:
                line.append(GAP)
            if name == "bar":
                line.append_text(_bar(bar_width, fraction or 0.0, options.ascii_only))
            else:
                line.append(texts[name], style="bold" if name in ("phase", "epoch") else "")
        yield line


class _Display(ABC):
    """A live line on a terminal, plain lines elsewhere; `clock` is injectable so that tests need not sleep.

    `order` lists the fields as shown, `priority` the same names most needed first (what `fit` keeps).
    """

    order: list[str]
    priority: list[str]

    def __init__(
        self,
        console: Console | None,
        every_s: float,
        clock: Callable[[], float],
        transient: bool,
        quiet: bool = False,
        phase_line_s: float = PHASE_LINE_S,
    ) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.transient = transient
        self.every_s = every_s
        self.clock = clock
        self.t0 = clock()
        self.last_line = self.t0
        self.phase: str | None = None
        self.phase_line_s = phase_line_s
        self._pending: str | None = None  # plain mode: the current phase's line, not yet written
        self._lock = threading.Lock()  # the pending phase's timer writes from its own thread
        self._timer: threading.Timer | None = None
        self.line = _Line(self.fields, self.order, self.priority)  # what the live display redraws
        self._live = (
            Live(
                self.line,
                console=self.console,
                refresh_per_second=4,
                transient=transient,
                redirect_stdout=False,  # stdout is data: it must never be routed to the terminal
            )
            if self.live
            else None
        )

    @abstractmethod
    def fields(self) -> tuple[dict[str, str], float | None]:
        """The texts to show now by name, and the bar's fraction (None: no bar)."""

    def say(self, line: str) -> None:
        """One plain line on the console (plain mode only), after the pending phase's line."""
        self.flush_phase()
        self._write(line)

    def _write(self, line: str) -> None:
        self.last_line = self.clock()
        if self.quiet:
            return
        self.console.file.write(line + "\n")
        self.console.file.flush()

    def flush_phase(self) -> None:
        """Write the pending phase's line now (plain mode; nothing when none is pending)."""
        with self._lock:
            line, self._pending = self._pending, None
            if line is not None:
                self._write(line)

    def drop_phase(self) -> None:
        """Forget the pending phase's line: the error that ended it speaks for it."""
        with self._lock:
            self._pending = None
            if self._timer is not None:
                self._timer.cancel()

    def on_phase(self, phase: str) -> None:
        """A phase begins: the live line names it; in plain mode its line is due (see the module docstring)."""
        self.phase = phase
        if self.live:
            return
        self.flush_phase()  # the phase before has ended: its line is due now
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._pending = f"{phase}{GAP}elapsed {hms(self.clock() - self.t0)}"
        self._timer = threading.Timer(self.phase_line_s, self.flush_phase)
        self._timer.daemon = True
        self._timer.start()

    def __enter__(self) -> Self:
        if self._live is not None:
            self._live.transient = self.transient
            self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.flush_phase()
        self.drop_phase()  # and stop its timer
        if self._live is not None:
            self._live.stop()


@contextmanager
def preparing(display: _Display | None, phase: str) -> Iterator[None]:
    """Show `phase` while the block runs, then take the live line off again (the display's `with` shows it anew).

    For what comes before the display's own `with`: `record` imports torch (seconds on a cold start)
    before it can enter the block whose exceptions it catches by their torch-side types.
    """
    if display is None:
        yield
        return
    display.on_phase(phase)
    live = display._live
    if live is not None:
        live.transient = True  # restarted by the display's `with`: no line is left behind
        live.start()
    try:
        yield
    except BaseException:
        display.drop_phase()
        raise
    finally:
        if live is not None:
            live.stop()


class TrainingProgress(_Display):
    """Epoch, bar, step, batch loss and error, samples/s, elapsed and ETA; during preparation, the phase.

    The batch loss and error are read from the device (a synchronization) at most every 0.1 s on a
    terminal, and only for a line in plain mode. Phases can be shown from the start; `plan` gives the
    run's shape (known once the config is) before the first step.
    """

    order = ["phase", "epoch", "bar", "step", "loss", "err", "rate", "elapsed", "eta"]
    priority = ["elapsed", "eta", "phase", "step", "epoch", "loss", "bar", "err", "rate"]

    def __init__(
        self,
        *,
        console: Console | None = None,
        every_s: float = EVERY_S,
        phase_line_s: float = PHASE_LINE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan(0, 0, 0)
        self.loss = self.err = "-"
        self.first: tuple[float, int] | None = None  # (time, step) after the first step seen: the rate counts from it
        self._read = float("-inf")
        super().__init__(console, every_s, clock, transient=False, phase_line_s=phase_line_s)

    def plan(self, total_steps: int, epochs: int, samples_per_step: int) -> None:
        """The run's shape: `epochs` epochs of equally many steps, `samples_per_step` samples (all replicates) each."""
        self.total = total_steps
        self.epochs = epochs
        self.steps_per_epoch = max(total_steps // max(epochs, 1), 1)
        self.samples_per_step = samples_per_step
        self.step = self.epoch = 0

    def _rate(self, now: float) -> float | None:
        """Steps per second after the first step seen (None until a second one): step 1 pays for warm-up."""
        if self.first is None or self.step <= self.first[1] or now <= self.first[0]:
            return None
        return (self.step - self.first[1]) / (now - self.first[0])

    def fields(self) -> tuple[dict[str, str], float | None]:
        """Phase view before the first step (and while closing), training view otherwise."""
        now = self.clock()
        rate = self._rate(now)
        done = self.total > 0 and self.step >= self.total
        eta = hms((self.total - self.step) / rate) if rate else ("0:00:00" if done else "-:--:--")
        times = {"elapsed": f"elapsed {hms(now - self.t0)}", "eta": f"eta {eta}"}
        if self.phase is not None:
            steps = {"step": f"step {self.step}/{self.total}"} if self.step else {}
            return {"phase": self.phase, **steps, **times}, None
        texts = {
            "epoch": f"epoch {self.epoch}/{self.epochs}",
            "step": f"step {self.step}/{self.total}",
            "loss": f"loss {self.loss}",
            "err": f"err {self.err}",
            "rate": f"{(rate or 0) * self.samples_per_step:,.0f} samples/s" if rate else "- samples/s",
            **times,
        }
        return texts, self.step / max(self.total, 1)

    def on_step(self, info: StepInfo) -> None:
        """Note the step; read its loss when the live line is due (0.1 s) or a plain line is (epoch end, every_s)."""
        now = self.clock()
        if self.first is None:
            self.first = (now, info.step)
            self.flush_phase()  # the last preparation phase has ended
        self.step, self.phase = info.step, None
        self.epoch = info.epoch + 1
        epoch_end = info.step % self.steps_per_epoch == 0
        if self.live:
            if now - self._read < 0.1:
                return
        elif not (epoch_end or now - self.last_line >= self.every_s):
            return
        self._read = now
        self.loss = f"{float(info.batch_loss.mean()):.4f}"
        self.err = f"{float(info.batch_error.mean()):.3f}"
        if not self.live:
            texts, _ = self.fields()
            self.say(GAP.join(texts[name] for name in self.order if name in texts))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None and self.first is not None:
            self.phase = None  # the last live line shows the finished run, not "closing store"
        if exc_type is not None and self.first is None and self._live is not None:
            self._live.transient = True  # failed while preparing: the error line stands alone
        super().__exit__(exc_type, exc, tb)


class CountProgress(_Display):
    """`compacting` / `verifying`: description, bar, done/total, elapsed and ETA; gone from a terminal when done.

    In plain mode a line every `every_s` seconds, none when it takes less (the command's summary follows).
    """

    order = ["phase", "bar", "count", "elapsed", "eta"]
    priority = ["elapsed", "eta", "phase", "count", "bar"]

    def __init__(
        self,
        description: str,
        total: int,
        unit: str = "arrays",
        *,
        quiet: bool = False,
        console: Console | None = None,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.unit, self.done = total, unit, 0
        super().__init__(console, every_s, clock, transient=True, quiet=quiet)
        self.phase = description

    def fields(self) -> tuple[dict[str, str], float | None]:
        """Description, count and times; the bar's fraction done."""
        assert self.phase is not None
        elapsed = self.clock() - self.t0
        eta = hms(elapsed * (self.total - self.done) / self.done) if self.done else "-:--:--"
        texts = {
            "phase": self.phase,
            "count": f"{self.done}/{self.total} {self.unit}",
            "elapsed": f"elapsed {hms(elapsed)}",
            "eta": f"eta {eta}",
        }
        return texts, self.done / max(self.total, 1)

    def _line(self) -> None:
        texts, _ = self.fields()
        self.say(GAP.join(texts[name] for name in self.order if name in texts))

    def advance(self, item: object = None) -> None:
        """One more done (`item`, e.g. the array's path, is not shown); in plain mode a line every `every_s`."""
        self.done += 1
        if not self.live and self.clock() - self.last_line >= self.every_s:
            self._line()
