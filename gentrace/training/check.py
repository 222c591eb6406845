"""`gentrace check CONFIG`: the dry run before a long job, with every row discarded.

Builds the data, the models and the probes exactly as `record` does (`run.prepare`, after the same
preflight checks, so a bad config fails here with record's one-line error), then, with the recorder
attached to a `DiscardSink` (no store is created):

1. every probe's step-0 pass (`at_step(0, 0)`, with the resume checkpoint of the `params` row), timed
   one probe at a time;
2. `TIMED_STEPS` training steps with every probe's in-step hooks (`Trainer.train_steps(count=...)`),
   each timed; the first pays one-time costs (allocations, kernel choice), so the estimate uses the
   last;
3. one resume checkpoint, now that the optimizer has its state.

The table has one row per stream `record` would write (`recorder.streams()`: the preallocated rows
and array specs), and the summary extrapolates with the step grid (all of it an estimate):

    run time   = t_build + total_steps x t_step + sum over streams of (t_probe(0) / rows at step 0) x rows
                 + checkpoints x t_checkpoint
    store size = sum of gentrace.task.budget.store_parts (compressed, on disk; the raw bytes are
                 rows x bytes_per_row, from the StreamSpecs)

A probe's scheduled pass costs at every recorded row what it cost at step 0 (the same forward and
backward work); metrics and preds share one evaluation per step (gentrace.record.evaluator), which is
counted with metrics. Resume checkpoints are written at the last snapshot and at most every
`record.checkpoint_every_s` before it (counted from the run's start). Not counted: the store writer
(a background thread, which competes with training on a busy CPU) and what in-step probes do at
steps other than the timed ones (`record.lipschitz_fine.every_steps` > 1).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gentrace.core.config import RunConfig, is_factory
from gentrace.record.base import Checkpointed, StepInfo
from gentrace.record.params import TensorSnapshotProbe
from gentrace.record.recorder import DiscardSink, Recorder
from gentrace.store import schema
from gentrace.store.schema import StreamSpec
from gentrace.task import budget
from gentrace.training import preflight, run
from gentrace.training.loop import Trainer

TIMED_STEPS = 2  # the first step pays one-time costs; the estimate uses the last
NAMES_SHOWN = 6  # tensors or call sites listed in the `what` column before "+N more"
MIB = 2**20
DIGITS = {"raw_mib": 6, "est_mib": 6, "step0_s": 6, "est_s": 6}  # a byte in MiB, a microsecond
COLUMNS = ("stream", "arrays", "rows", "bytes_per_row", "raw_mib", "est_mib", "step0_s", "est_s", "what")


@dataclasses.dataclass(frozen=True)
class CheckSummary:
    """What `gentrace check` measured and estimated (seconds, bytes); every `est_` field is an estimate.

    Attributes:
        name: the config's name.
        device: where the models ran.
        parameters: elements of one replicate's parameters; `trainable` of them not frozen.
        replicates: M, models trained together.
        n_train: training samples per replicate; `n_test` test samples.
        total_steps: optimizer steps of the run (`steps_per_epoch` x `epochs`).
        prepare_s: seconds to build the data, the models and the probes (record does the same first).
        step_s: seconds of each timed training step, in order (the last is the one extrapolated).
        step0_s: seconds of every probe's step-0 pass together (step 0's checkpoint included).
        checkpoint_s: seconds to serialize one resume checkpoint after the timed steps, when the optimizer
            has its state (0 when the run writes none).
        checkpoint_bytes: bytes of that checkpoint; `est_checkpoints` of them written in the run.
        est_train_s: total_steps x the last timed step.
        est_probes_s: the probes' scheduled passes over the run, checkpoints included.
        raw_bytes: uncompressed bytes of every stream's rows (StreamSpec arithmetic).
        est_store_bytes: bytes the store takes on disk, compressed (gentrace.task.budget.store_parts).
        out: where `record` puts the store by default; `free_bytes` free there (None: unknown).
    """

    name: str
    device: str
    parameters: int
    trainable: int
    replicates: int
    n_train: int
    n_test: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    prepare_s: float
    step_s: tuple[float, ...]
    step0_s: float
    checkpoint_s: float
    checkpoint_bytes: int
    est_checkpoints: int
    est_train_s: float
    est_probes_s: float
    raw_bytes: int
    est_store_bytes: int
    out: Path
    free_bytes: int | None

    @property
    def est_total_s(self) -> float:
        """Estimated wall time of `record` after its imports: building, training and the probes' passes."""
        return self.prepare_s + self.est_train_s + self.est_probes_s


@dataclasses.dataclass(frozen=True)
class _Timed:
    """What `check` timed besides the probes: building data and models, the training steps, a checkpoint."""

    prepare_s: float
    step_s: tuple[float, ...]
    checkpoint_s: float
    checkpoint_bytes: int


@dataclasses.dataclass(frozen=True)
class _ProbeTime:
    """One probe's step-0 pass: seconds (its checkpoint's among them) and rows handed over per stream."""

    seconds: float
    checkpoint_s: float
    rows: dict[str, int]


def check(cfg: RunConfig, device: str = "auto") -> tuple[pd.DataFrame, CheckSummary]:
    """Dry-run `cfg`: one row per stream `record` would write (columns COLUMNS) and the summary.

    Raises:
        ConfigError: anything `record` refuses before it creates a store, in record's words.
    """
    preflight.record(cfg, None, device=device, resume=False, overwrite=False)
    dev = run.resolve_device(device)
    start = time.perf_counter()
    trainer, recorder, _ = run.prepare(cfg, dev)
    prepare_s = time.perf_counter() - start
    sink = DiscardSink()
    recorder.attach(sink)
    with recorder:
        probe_times = _step_zero(trainer, recorder, sink, dev)
        step_s = _time_steps(trainer, recorder, dev)
        # after the steps the optimizer has its state (momentum, adam's moments): a checkpoint of its size
        checkpoint_s, checkpoint_bytes = _time_checkpoint(trainer, recorder) if _checkpointing(recorder) else (0.0, 0)
    timed = _Timed(prepare_s, step_s, checkpoint_s, checkpoint_bytes)
    return _report(cfg, trainer, recorder.streams(), probe_times, sink, timed, str(dev))


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work: a CUDA call returns before its kernels finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_zero(trainer: Trainer, recorder: Recorder, sink: DiscardSink, device: torch.device) -> list[_ProbeTime]:
    """Each probe's `at_step(0, 0)` and flush, timed alone, its rows into `sink`; order of `recorder.probes`.

    A `Checkpointed` row gets its checkpoint as the Recorder gives it one (Trainer.checkpoint with every
    probe's state), so the `params` probe's time includes serializing the training state.
    """
    times = []
    for probe in recorder.probes:
        before = dict(sink.rows)
        checkpoint_s = 0.0
        _sync(device)
        start = time.perf_counter()
        for item in [*probe.at_step(0, 0), *probe.flush()]:
            if isinstance(item, Checkpointed):
                tick = time.perf_counter()
                payload = trainer.checkpoint({"probes": recorder.state()})
                checkpoint_s += time.perf_counter() - tick
                item = dataclasses.replace(item.block, checkpoint=payload)
            sink.put(item)
        _sync(device)
        seconds = time.perf_counter() - start
        rows = {s.name: sink.rows.get(s.name, 0) - before.get(s.name, 0) for s in probe.streams()}
        times.append(_ProbeTime(seconds, checkpoint_s, rows))
    return times


class _Clock:
    """A step observer that notes when each step ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []

    def on_step(self, info: StepInfo) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())


def _time_steps(trainer: Trainer, recorder: Recorder, device: torch.device) -> tuple[float, ...]:
    """Seconds of each of the first TIMED_STEPS training steps (fewer when the run has fewer)."""
    clock = _Clock(device)
    _sync(device)
    start = time.perf_counter()
    trainer.train_steps(recorder, [clock], count=TIMED_STEPS)
    return tuple(float(t) for t in np.diff([start, *clock.ends]))


def _time_checkpoint(trainer: Trainer, recorder: Recorder) -> tuple[float, int]:
    """(seconds, bytes) of one resume checkpoint as the Recorder takes it: the training state and the probes'."""
    start = time.perf_counter()
    payload = trainer.checkpoint({"probes": recorder.state()})
    return time.perf_counter() - start, len(payload)


def bytes_per_row(spec: StreamSpec) -> int:
    """Uncompressed bytes of one row of a stream: sum over its arrays of prod(row_shape) x itemsize."""
    return sum(math.prod(a.row_shape) * np.dtype(a.dtype).itemsize for a in spec.arrays)


def what(spec: StreamSpec) -> str:
    """What a stream's rows hold, in words: its tensors with their shapes, call sites, splits or arrays."""
    paths = [a.path for a in spec.arrays]
    shapes = {a.path: a.row_shape for a in spec.arrays}
    stream = schema.STREAMS.get(spec.name)
    if isinstance(stream, schema.GradStream):
        names = stream.tensors_in(paths)
        shown = [f"{n} {_shape(shapes[stream.moment(n, 'sum')][1:])}" for n in names]
        return f"{' '.join(stream.MOMENTS)} of {_listed(shown, 'tensor')}"
    if isinstance(stream, schema.ActsStream):
        names = stream.layers_in(paths)
        probe = shapes[stream.bits(names[0])][0] if names else 0
        units = [f"{n} ({_units(spec, stream.bits(n))} units)" for n in names]
        return f"{_listed(units, 'call site')}; {probe} probe samples"
    if isinstance(stream, schema.TensorStream):
        names = stream.tensors_in(paths)
        return _listed([f"{n} {_shape(shapes[stream.tensor(n)][1:])}" for n in names], "tensor")
    if isinstance(stream, schema.PredsStream):
        names = stream.names_in(paths)
        return _listed([f"{n} {shapes[stream.split(n)][-1]}" for n in names], "split")
    if stream is None:
        return "; ".join(paths)
    return "; ".join(stream.names_in(paths))


def _units(spec: StreamSpec, bits_path: str) -> int:
    """Units of a call site: its bitmask array's `units` attr (the packed width x 8 rounds up)."""
    array = next(a for a in spec.arrays if a.path == bits_path)
    return int(array.attrs.get("units", array.row_shape[-1] * 8))


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _listed(items: Sequence[str], noun: str) -> str:
    """`3 tensors: a; b; c`, the first NAMES_SHOWN only."""
    head = "; ".join(items[:NAMES_SHOWN])
    more = f"; +{len(items) - NAMES_SHOWN} more" if len(items) > NAMES_SHOWN else ""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}: {head}{more}"


def _budget_bytes(parts: Sequence[budget.Part], stream: str) -> float:
    """The budget's bytes of one stream (its part is named `<stream> (<rows> rows)`); NaN without one."""
    found = [p.nbytes for p in parts if p.what.startswith(f"{stream} (")]
    return float(sum(found)) if found else math.nan


def _report(
    cfg: RunConfig,
    trainer: Trainer,
    specs: Sequence[StreamSpec],
    probe_times: Sequence[_ProbeTime],
    sink: DiscardSink,
    timed: _Timed,
    device: str,
) -> tuple[pd.DataFrame, CheckSummary]:
    """The per-stream table and the summary, extrapolated from the timings (see the module docstring)."""
    tl = trainer.timeline
    # budget sizes gentrace's own models and data from the config; a factory's run is sized by its raw bytes
    sized = not (is_factory(cfg.model.arch) or is_factory(cfg.data.name))
    parts = budget.store_parts(cfg) if sized else []
    # stream -> (seconds at step 0 without checkpoints, rows then): a probe's pass repeats at each row
    step0 = {stream: (pt.seconds - pt.checkpoint_s, rows) for pt in probe_times for stream, rows in pt.rows.items()}
    records = []
    for spec in specs:
        seconds, rows0 = step0.get(spec.name, (0.0, 0))
        per_row = seconds / rows0 if rows0 else 0.0  # no row at step 0: its work is inside the training step
        records.append(
            {
                "stream": spec.name,
                "arrays": len(spec.arrays),
                "rows": spec.rows,
                "bytes_per_row": bytes_per_row(spec),
                "raw_mib": spec.rows * bytes_per_row(spec) / MIB,
                "est_mib": (_budget_bytes(parts, spec.name) if sized else spec.rows * bytes_per_row(spec)) / MIB,
                "step0_s": seconds,
                "est_s": per_row * spec.rows,
                "what": what(spec),
            }
        )
    table = pd.DataFrame(records, columns=list(COLUMNS)).round(DIGITS)
    step_s = timed.step_s
    est_train_s = tl.total_steps * (step_s[-1] if step_s else 0.0)
    passes_s = float(table["est_s"].sum())
    checkpoints = _checkpoints(cfg, specs, timed.checkpoint_bytes > 0, est_train_s + passes_s)
    model = trainer.models[0]
    target = Path("runs") / f"{cfg.name}.zarr"  # where preflight looks for the default store's disk
    summary = CheckSummary(
        name=cfg.name,
        device=device,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        replicates=len(trainer.models),
        n_train=cfg.data.n_train,
        n_test=int(trainer.data.x_test.shape[0]),
        steps_per_epoch=tl.steps_per_epoch,
        epochs=tl.epochs,
        total_steps=tl.total_steps,
        prepare_s=timed.prepare_s,
        step_s=step_s,
        step0_s=sum(pt.seconds for pt in probe_times),
        checkpoint_s=timed.checkpoint_s,
        checkpoint_bytes=timed.checkpoint_bytes,
        est_checkpoints=checkpoints,
        est_train_s=est_train_s,
        est_probes_s=passes_s + checkpoints * timed.checkpoint_s,
        raw_bytes=int(sum(spec.rows * bytes_per_row(spec) for spec in specs)),
        est_store_bytes=int(sum(p.nbytes for p in parts))
        if sized
        else int(sum(s.rows * bytes_per_row(s) for s in specs)),
        out=target.parent,
        free_bytes=budget.free_disk(target),
    )
    return table, summary


def _checkpointing(recorder: Recorder) -> bool:
    """Whether the run writes resume checkpoints: a `params` stream that carries them, and a loop to take them."""
    snapshots = (p for p in recorder.probes if isinstance(p, TensorSnapshotProbe))
    return recorder.checkpointer is not None and any(p.checkpoints for p in snapshots)


def _checkpoints(cfg: RunConfig, specs: Sequence[StreamSpec], writes: bool, run_s: float) -> int:
    """Resume checkpoints the run writes: the last snapshot's, and one every checkpoint_every_s before it (0: every)."""
    if not writes:
        return 0
    snapshots = next((spec.rows for spec in specs if spec.name == schema.PARAMS.name), 0)
    every = cfg.record.checkpoint_every_s
    if every <= 0:
        return snapshots
    return min(snapshots, 1 + int(run_s // every))


def _seconds(s: float) -> str:
    """`850 ms`, `12.3 s`, `4 min 10 s`, `2 h 05 min`."""
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def summary_lines(s: CheckSummary) -> list[str]:
    """The human summary of `gentrace check` (for stderr): model, timed steps, estimated time and size."""
    frozen = f" ({s.trainable:,} trainable)" if s.trainable != s.parameters else ""
    warm = f" (the first, with one-time costs: {_seconds(s.step_s[0])})" if len(s.step_s) > 1 else ""
    last = s.step_s[-1] if s.step_s else 0.0
    checkpoints = (
        f", {s.est_checkpoints} resume checkpoints of {budget.size(s.checkpoint_bytes)} "
        f"({_seconds(s.checkpoint_s)} each)"
        if s.est_checkpoints
        else ""
    )
    free = "unknown" if s.free_bytes is None else budget.size(s.free_bytes)
    fits = "" if s.free_bytes is None or s.est_store_bytes <= s.free_bytes else "; it does not fit"
    return [
        f"model: {s.parameters:,} parameters{frozen} x {s.replicates} replicate(s), on {s.device}",
        f"data: {s.n_train} training samples per replicate, {s.n_test} test samples; "
        f"{s.epochs} epochs x {s.steps_per_epoch} steps = {s.total_steps} optimizer steps",
        f"timed: building data and models {_seconds(s.prepare_s)}; training step {_seconds(last)}{warm}; "
        f"every probe at step 0 {_seconds(s.step0_s)}",
        f"estimated run time: {_seconds(s.est_total_s)} (an estimate: building {_seconds(s.prepare_s)}, "
        f"{s.total_steps} steps x {_seconds(last)} = {_seconds(s.est_train_s)}, probe passes "
        f"{_seconds(s.est_probes_s)}{checkpoints}; the store writer not counted)",
        f"estimated store size: {budget.size(s.est_store_bytes)} on disk (an estimate, compressed; raw rows "
        f"{budget.size(s.raw_bytes)}); free at {s.out}/: {free}{fits}",
    ]
