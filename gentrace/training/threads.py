"""How many intra-op threads a recording uses (`train.threads`, default `auto`).

torch starts one intra-op thread per core. For the small models of a training-dynamics study that
is a little faster on a quiet machine, and a collapse beside anything busy: measured on the quick
start (2 cores, 10 epochs, training only), 2 threads take 0.22 s quiet but 1.1 s beside ONE busy
process, while 1 thread takes 0.26 s either way. OpenMP's passive wait policy does not fix it (it
costs 4x quiet), so the lever is the thread count.

`auto` therefore looks at the machine before training: it samples, over `WINDOW_S`, how many of this
process's allowed CPUs (`os.sched_getaffinity`) other processes keep busy (`/proc/stat` per CPU,
minus this process's own time from `/proc/self/stat`) and takes the rest, at least 1 and at most
torch's default. An explicit `OMP_NUM_THREADS` is respected, and under torchrun the ranks of a node
share its cores (`cores // LOCAL_WORLD_SIZE`) without sampling. Elsewhere (no `/proc`) it is torch's
default.

The count is chosen once, when the store is created, and stored in its `threads` attribute:
the thread count changes float rounding (reductions split across threads), so a `--resume` uses the
stored count to continue to the same final result as an uninterrupted run. Measured side by side in
`benchmarks/threads.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# Long enough to see a busy process at the kernel's 100 Hz accounting (25 ticks per core), short
# enough not to be felt at start-up; the time since this module was imported counts towards it.
WINDOW_S = 0.25
# A reading older than this says nothing about now: take a fresh one.
STALE_S = 5.0
# torch's own default, before anything in this process changed it.
TORCH_DEFAULT = torch.get_num_threads()


@dataclass(frozen=True)
class Reading:
    """CPU time counters at one moment, in clock ticks: per allowed CPU (busy, total) and this process."""

    at: float
    busy: int
    total: int
    own: int


def _cpus() -> set[int]:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def read(proc: Path = Path("/proc")) -> Reading | None:
    """The counters now (None where there is no Linux `/proc` to read)."""
    try:
        stat = (proc / "stat").read_text().splitlines()
        own_fields = (proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
        allowed = _cpus()
        busy = total = 0
        for line in stat:
            name, *values = line.split() or [""]
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in allowed:
                continue
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
        # fields after the command: state(0) ... utime(11) stime(12)
        own = int(own_fields[11]) + int(own_fields[12])
    except (OSError, IndexError, ValueError):  # no /proc, or one this parser does not know: torch's default
        return None
    return Reading(time.monotonic(), busy, total, own)


def others_busy(before: Reading, after: Reading, cpus: int) -> float:
    """How many CPUs' worth of time other processes used between two readings."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    per_cpu = total / cpus
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / per_cpu


def fair_share(cpus: int, busy_elsewhere: float, ceiling: int) -> int:
    """The CPUs nobody else keeps busy, rounded, at least 1 and at most `ceiling`."""
    return max(1, min(ceiling, int(cpus - busy_elsewhere + 0.5)))


_IMPORTED = read()


def choose(requested: int | str, *, local_world: int = 1) -> int:
    """The thread count for `train.threads = requested` (an int is taken as it is); see the module doc."""
    if isinstance(requested, int):
        return requested
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    cpus = len(_cpus())
    if local_world > 1:
        return max(1, min(TORCH_DEFAULT, cpus // local_world))
    # The import-time reading starts the first window (the imports' time counts towards it); it is
    # taken once: a later run in this process samples from its own start, not from before the last one.
    global _IMPORTED
    imported, _IMPORTED = _IMPORTED, None
    before = imported if imported is not None and time.monotonic() - imported.at < STALE_S else read()
    if before is None:
        return TORCH_DEFAULT
    time.sleep(max(0.0, WINDOW_S - (time.monotonic() - before.at)))
    after = read()
    if after is None:
        return TORCH_DEFAULT
    return fair_share(cpus, others_busy(before, after, cpus), TORCH_DEFAULT)


@contextmanager
def using(count: int) -> Iterator[None]:
    """Make torch use `count` intra-op threads inside the block; the previous count comes back after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
