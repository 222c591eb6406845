"""`gentrace record` as a library call: config -> data -> models -> store -> train + record.

Everything that can be wrong with the input (config, data set size, tensor names, frozen
prefixes, the store path) is checked before the store is created, so bad input never leaves
a half-written store behind. Faults during training end with a status in the store (SPEC
section 7): `diverged` (NaN loss), `interrupted` (SIGINT), `failed` (anything else); a SIGKILL
leaves `running` with no live writer, which readers report as `killed`.

Under torchrun (several processes, DistributedDataParallel; gentrace.training.distributed) every rank
builds the same data and models and trains its piece of each batch; rank 0 alone creates, opens and
writes the store, and a failure there stops every rank before training starts. `--resume` works
under torchrun too, with any number of processes (a run does not depend on how many recorded it).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import torch

from gentrace.core.config import RecordConfig, RunConfig, from_dict, to_dict
from gentrace.core.errors import ConfigError, PeerFailed, StoreError, TrainingDiverged
from gentrace.core.schedules import Timeline
from gentrace.core.version import __version__
from gentrace.record.base import RunContext
from gentrace.record.ranks import Dist
from gentrace.record.recorder import Recorder
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.store.writer import StoreWriter, create_store, open_for_resume
from gentrace.task import checkpoint, plugins
from gentrace.task.data import Dataset, build_data
from gentrace.task.losses import output_dim, resolve_loss
from gentrace.task.models import apply_freeze, build_model
from gentrace.training import threads
from gentrace.training.distributed import check_config, local_world, session
from gentrace.training.loop import StepObserver, Trainer

T = TypeVar("T")

PEER_GRACE_S = 10.0

Phase = Callable[[str], None]
"""Told the name of each preparation phase as it begins (what a progress display shows before step 1)."""

# The phases `record` reports, in order. A new run: data, models, store, step 0's probes, training, close;
# a resume: reading the store, data, models, checkpoint, reopening the store, training, close.
READING_STORE = "reading store"
LOADING_DATA = "loading data"
BUILDING_MODELS = "building models"
CREATING_STORE = "creating store"
RESTORING_CHECKPOINT = "restoring checkpoint"
REOPENING_STORE = "reopening store"
STEP0_PROBES = "step 0 probes"
CLOSING_STORE = "closing store"


def _silent(phase: str) -> None:
    """The default phase callback: nobody is watching."""


class Interrupted(Exception):
    """SIGINT during recording: the store was flushed and marked `interrupted`."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"interrupted; the store {path} keeps every committed row (continue with --resume)")
        self.path = path


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a CUDA device that is absent is bad input."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this machine has no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def default_store_path(cfg: RunConfig) -> Path:
    """`runs/<config name>-<timestamp>.zarr`."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}.zarr"


def to_device(data: Dataset, device: torch.device) -> Dataset:
    """The data set with its tensors on `device` (what the probes evaluate on)."""
    return dataclasses.replace(
        data,
        x_train=data.x_train.to(device),
        y_train=data.y_train.to(device),
        x_test=data.x_test.to(device),
        y_test=data.y_test.to(device),
    )


def prepare(
    cfg: RunConfig, device: torch.device, dist: Dist | None = None, phase: Phase = _silent
) -> tuple[Trainer, Recorder, Dataset]:
    """Build data, models, trainer and recorder; raises on any bad input before a store exists.

    `phase` is told LOADING_DATA, then BUILDING_MODELS (the models, their copies on the device, the probes).
    """
    dist = dist or Dist()
    phase(LOADING_DATA)
    data = build_data(cfg.data, cfg.train.replicates)
    loss = resolve_loss(cfg.train.loss, data.num_classes)
    if loss == "bce" and data.num_classes != 2:
        raise ConfigError(f"train.loss = 'bce' needs two classes; this data has {data.num_classes}")
    phase(BUILDING_MODELS)
    model = build_model(cfg.model, data.input_shape, output_dim(loss, data.num_classes))
    apply_freeze(model, cfg.model.freeze)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model.freeze freezes every parameter; nothing would train")
    if dist.world > 1:
        model = check_config(cfg, model, device)
    models = [copy.deepcopy(model).to(device) for _ in range(cfg.train.replicates)]
    on_device = to_device(data, device)
    trainer = Trainer(cfg, on_device, models, dist)
    ctx = RunContext(cfg.record, on_device, models, trainer.loss, trainer.timeline, device, cfg.train.lr, dist)
    recorder = Recorder(ctx, checkpointer=trainer)
    return trainer, recorder, data


def run_attrs(
    cfg: RunConfig, data: Dataset, device: torch.device, loss: str, timeline: Timeline, processes: int = 1
) -> dict[str, Any]:
    """The root attributes a new store starts with: the config, versions, device and the run's shape.

    `gentrace record` and `gentrace.Run` both write them (the latter adds its `own_loop` attribute);
    `processes` is the number of torchrun ranks that recorded the run (1 = a single process).
    """
    factories = plugins.recorded(cfg)
    return ({"factories": factories} if factories else {}) | {
        "gentrace_version": __version__,
        "config": to_dict(cfg),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "device": str(device),
        "processes": processes,
        "threads": torch.get_num_threads(),
        "loss": loss,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "replicates": cfg.train.replicates,
        "steps_per_epoch": timeline.steps_per_epoch,
        "total_steps": timeline.total_steps,
    }


def static_arrays(data: Dataset, record: RecordConfig) -> dict[str, np.ndarray]:
    """The static `data/` arrays of a run on `data`: path -> array, written once when the store is created.

    The indices, labels and noise mask (schema.data_arrays), and with `record.inputs` the inputs themselves
    (schema.input_arrays: `data/x_train` [M, n, *input_shape], `data/x_test` [n_test, *input_shape] float32).
    """
    arrays = schema.data_arrays(
        data.train_index, data.test_index, data.y_train.cpu().numpy(), data.y_test.cpu().numpy(), data.noise_mask
    )
    if record.inputs:
        arrays |= schema.input_arrays(data.x_train.cpu().numpy(), data.x_test.cpu().numpy())
    return arrays


def record(
    cfg: RunConfig | None,
    out: Path | None,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    observers: Sequence[StepObserver] = (),
    phase: Phase = _silent,
) -> Path:
    """Record a run into `out` (or continue the run stored there with `resume`); returns the store path.

    `observers` see every optimizer step; `phase` is told each phase before, between and after them
    (LOADING_DATA ... CLOSING_STORE, in the order listed at the top of this module).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    with session(device) as (dist, dist_device):
        dev = dist_device or resolve_device(device)
        if resume:
            if out is None:
                raise ConfigError("--resume needs --out STORE: the store to continue")
            return _resume(cfg, out, dev, observers, dist, phase)
        assert cfg is not None
        path = Path(str(dist.broadcast(out if out is not None else default_store_path(cfg))))  # rank 0's timestamp
        _on_main(dist, dev, lambda: _check_new(path, overwrite))
        _start_new(cfg, path, dev, dist, observers, phase, overwrite=overwrite)
    return path


def _start_new(
    cfg: RunConfig,
    path: Path,
    dev: torch.device,
    dist: Dist,
    observers: Sequence[StepObserver],
    phase: Phase,
    *,
    overwrite: bool,
    count: int | None = None,
) -> None:
    """Create the store (Ctrl-C held until it exists whole) and train into it from step 0.

    The thread count (`train.threads`, gentrace.training.threads) is chosen here and stored in the
    `threads` attribute, which a resume reuses; `count`: the one a run that starts over had stored
    (another count would round differently from the run it replaces).
    """
    with threads.using(_thread_count(cfg, count)):
        trainer, recorder, data = prepare(cfg, dev, dist, phase)
        phase(CREATING_STORE)
        static = {**static_arrays(data, cfg.record), **recorder.static()}
        attrs = run_attrs(cfg, data, dev, trainer.loss, trainer.timeline, trainer.dist.world)
        writer = _open_whole(
            path, dist, dev, lambda: create_store(path, attrs, recorder.streams(), static, overwrite=overwrite)
        )
        _train(trainer, recorder, writer, path, observers, phase)


def _open_whole(
    path: Path, dist: Dist, device: torch.device, open_store: Callable[[], StoreWriter]
) -> StoreWriter | None:
    """`open_store()` on rank 0 (`_on_main`), Ctrl-C held until it is done; one meanwhile closes it `interrupted`."""
    with held_interrupts() as held:
        writer = _on_main(dist, device, open_store)
    if held.pending:
        if writer is not None:
            writer.close("interrupted")
        raise Interrupted(path)
    return writer


class _Held:
    """What `held_interrupts` saw: whether Ctrl-C (or SIGTERM) came while it held them."""

    pending = False


@contextmanager
def held_interrupts() -> Iterator[_Held]:
    """Hold SIGINT and SIGTERM during a store operation that must not be cut in half; the caller acts on `pending`.

    Outside the main thread (signals are delivered there only) this holds nothing.
    """
    held = _Held()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def note(signum: int, frame: FrameType | None) -> None:
        held.pending = True

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_new(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; pass --overwrite to replace it or --resume to continue it")


def _on_main(dist: Dist, device: torch.device, fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 alone (the store's only writer); if it fails there, every rank stops.

    Returns fn's result on rank 0 and None on the other ranks (and always fn's result in a single process).
    """
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except BaseException as exc:
            error = exc
    if dist.any(error is not None, device):
        if error is not None:
            raise error
        # Let rank 0 print its one-line error and exit first: torchrun then ends this rank (and
        # names rank 0's failure as the root cause) rather than killing rank 0 mid-message.
        time.sleep(PEER_GRACE_S)
        raise PeerFailed("rank 0 could not open the store; it reported why")
    return result


@dataclasses.dataclass(frozen=True)
class _ResumePoint:
    """What every rank needs to continue a store: its config, the checkpoint and the rows kept."""

    cfg: RunConfig
    step: int  # of the checkpoint resumed from
    keep: dict[str, int]  # stream -> rows at or before `step`
    checkpoint: bytes | None  # None: nothing was committed, start again from step 0
    threads: int | None = None  # the stored thread count (None: a store from before `threads` was stored)


def _resume(
    cfg: RunConfig | None, path: Path, dev: torch.device, observers: Sequence[StepObserver], dist: Dist, phase: Phase
) -> Path:
    # Rank 0 alone reads the store and hands the others what they need: under torchrun --nnodes the
    # store need not be on a file system that every node sees.
    phase(READING_STORE)
    point = dist.broadcast(_on_main(dist, dev, lambda: _resume_point(cfg, path)))
    if point is None:  # the run is complete
        return path
    assert isinstance(point, _ResumePoint)
    if point.checkpoint is None:  # killed before its first checkpoint: starting over loses nothing it had
        _start_new(point.cfg, path, dev, dist, observers, phase, overwrite=True, count=point.threads)
        return path
    # the stored thread count: another one would round differently from the uninterrupted run
    with threads.using(_thread_count(point.cfg, point.threads)):
        trainer, recorder, _ = prepare(point.cfg, dev, dist, phase)
        phase(RESTORING_CHECKPOINT)
        extra = trainer.restore(point.checkpoint)  # before the store is touched: a bad checkpoint destroys nothing
        recorder.load_state(extra.get("probes", {}))
        phase(REOPENING_STORE)
        writer = _open_whole(path, dist, dev, lambda: reopen(path, point.keep, recorder, point.step, upto=point.step))
        recorder.resume(point.keep)
        _train(trainer, recorder, writer, path, observers, phase)
    return path


def _thread_count(cfg: RunConfig, stored: int | None) -> int:
    """The store's own thread count when it has one (another rounds differently), else `train.threads`' choice."""
    return stored or threads.choose(cfg.train.threads, local_world=local_world())


def _resume_point(cfg: RunConfig | None, path: Path) -> _ResumePoint | None:
    """The last intact committed checkpoint of the store at `path` (None when the run is complete).

    Reads and loads the checkpoint before anything is changed: a damaged newest checkpoint falls
    back to the one before (with a warning); a store with no committed checkpoint yet starts over
    (a warning when it had rows), with the thread count it stored.
    """
    reader = StoreReader(path, check_checkpoint=False)
    if isinstance(reader.attrs.get("own_loop"), dict):
        raise StoreError(
            f"{path} was recorded by your own training loop (gentrace.Run); continue it there: "
            "gentrace.Run(..., resume=True) and run.load_state_dict() from your checkpoint"
        )
    stored = from_dict(reader.config)
    if cfg is not None and to_dict(cfg) != to_dict(stored):
        changed = _first_difference(to_dict(cfg), to_dict(stored))
        raise ConfigError(f"--resume: the config differs from the store's at {changed}; resume without a CONFIG")
    if reader.attrs.get("status") == "complete":
        return None
    count = reader.attrs.get("threads")
    stored_threads = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None
    nothing_committed = not any(reader.committed(s) for s in reader.streams())
    if nothing_committed or reader.attrs.get("status") == "initializing":
        return _ResumePoint(stored, -1, {}, None, stored_threads)
    if stored.record.params.every_epochs == 0:
        raise StoreError(
            f"{path} records no parameter snapshots (record.params.every_epochs = 0), so it cannot be "
            "resumed; record it again with --overwrite"
        )
    committed_steps = set(reader.array(schema.PARAMS.step).tolist()) if reader.committed(schema.PARAMS.name) else set()
    usable = [s for s in reader.checkpoint_steps() if s in committed_steps]
    if not usable:  # killed before its first checkpoint (step 0 has none): the run starts over, to the same result
        sys.stderr.write(f"warning: {path} has no resume checkpoint yet; the run starts over from step 0\n")
        return _ResumePoint(stored, -1, {}, None, stored_threads)
    damaged: list[str] = []
    for last in reversed(usable):
        try:
            payload = reader.checkpoint(last)
            _check_loadable(payload)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint (GentraceError too): try the one before
            damaged.append(f"step {last} ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})")
            continue
        if damaged:
            sys.stderr.write(
                f"warning: {path}: the checkpoint of {damaged[0]} is damaged; resuming from the one of step {last}\n"
            )
        keep = {s: int((reader.array(schema.step_of(s)) <= last).sum()) for s in reader.streams()}
        return _ResumePoint(stored, last, keep, payload, stored_threads)
    raise StoreError(  # every usable checkpoint is damaged (with none usable, the run started over above)
        f"{path} has no intact committed checkpoint to resume from (damaged: {', '.join(damaged)}); "
        "nothing was changed. Record it again with --overwrite"
    )


def _check_loadable(payload: bytes) -> None:
    """Raise unless `payload` deserializes to a training checkpoint (Trainer.checkpoint's layout)."""
    checkpoint.check(payload)


def reopen(path: Path, keep: dict[str, int], recorder: Recorder, checkpoint_step: int | None, upto: int) -> StoreWriter:
    """Lock the store for a resume: every stream cut back to `keep[stream]` rows, checkpoints after `upto` dropped.

    `checkpoint_step` becomes the store's newest checkpoint (None: none is left). A failure on the way
    marks the store `failed` and re-raises; the cut itself is crash-safe (StoreWriter.truncate).
    """
    writer = open_for_resume(path)
    try:
        writer.truncate(keep, checkpoint_step=checkpoint_step)
        writer.declare(recorder.streams())
        writer.prune_checkpoints(upto=upto)
    except BaseException:
        writer.close_after_failure("failed")
        raise
    return writer


def _train(
    trainer: Trainer,
    recorder: Recorder,
    writer: StoreWriter | None,
    path: Path,
    observers: Sequence[StepObserver],
    phase: Phase = _silent,
) -> None:
    """Train with `writer` taking the rows (None: a torchrun rank other than 0, whose rows are dropped)."""
    recorder.attach(writer)
    try:
        with recorder:
            if not trainer.restored:  # Trainer.run begins with step 0's probe pass, before the first step
                phase(STEP0_PROBES)
            trainer.run(recorder, observers)
            phase(CLOSING_STORE)  # the recorder's last flush (leaving `with`) and the writer's close
    except KeyboardInterrupt:
        with held_interrupts():  # a second Ctrl-C must not cut the flush short
            try:
                recorder.flush()
            finally:
                if writer is not None:
                    writer.close_after_failure("interrupted")
        raise Interrupted(path) from None
    except TrainingDiverged:
        try:
            recorder.flush()  # the loss history up to the divergence is what a user looks at
        finally:
            if writer is not None:
                writer.close_after_failure("diverged")
        raise
    except BaseException:
        if writer is not None:
            writer.close_after_failure("failed")
        raise
    with held_interrupts() as held:  # Ctrl-C during the final close: finish it, then report `interrupted`
        if writer is not None:
            writer.close("complete", final_status=lambda status: "interrupted" if held.pending else status)
    if held.pending:
        raise Interrupted(path)


def _first_difference(a: dict[str, object], b: dict[str, object], prefix: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key} ({va!r} here, {vb!r} in the store)"
    return ""
