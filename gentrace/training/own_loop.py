"""`gentrace.Run`: record a training loop the user writes, into the same store `gentrace record` writes.

The user keeps the loop (optimizer, schedule, augmentation, mixed precision, logging); gentrace
watches it through hooks and one call per optimizer step:

    run = gentrace.Run("runs/mine.zarr", model, train=train_set, test=test_set, loss="cross_entropy",
                       record={...}, epochs=E, steps_per_epoch=len(loader), optimizer=opt)
    with run:
        for epoch in range(E):
            for x, y in loader:
                opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()
                run.step(loss, y)

What is watched, and how (the probes are gentrace.record's, driven as gentrace.training.loop drives them):

- a forward pre-hook and a forward hook on each model see the training batch (train mode, grad
  enabled; the probes' own passes are not seen): its size, its outputs and, at the
  `record.lipschitz_fine` steps, its input made a leaf that requires grad;
- an optimizer step pre-hook reads the learning rate the step uses;
- `run.step(loss, y)` after `optimizer.step()`: the batch's loss (the tensor the user backpropagated,
  or None: computed from the outputs and `y`), the targets (for the batch error and the one-output
  Lipschitz constant), then every probe whose cadence falls on this step (with autocast off and
  grad on, whatever context the call is made in).

`record.grad_moments.source = "train-batches"` reads per-sample gradients from the user's own
backward: the loss must be the mean (`reduction="mean"`, the default) or the sum (`reduction="sum"`)
of per-sample losses of ONE forward per step (gradient accumulation is refused). `source = "probe"`
runs its own pass and takes any loop.

Crash safety is the store's (SPEC section 7): the writer runs in the background, a SIGKILL leaves a
store readable to its last committed row, an exception or Ctrl-C inside the `with` marks it
`failed` / `interrupted` and re-raises, a NaN loss raises TrainingDiverged (store `diverged`) unless
`on_nan="continue"`. Resume: `run.state_dict()` goes into the user's checkpoint (it first waits for
the writer, so the store holds every row up to that step); `Run(..., resume=True)` then
`run.load_state_dict(saved)` before `with run:` cuts every stream back to that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gentrace.core.config import OWN, DataConfig, ModelConfig, RecordConfig, RunConfig, TrainConfig, from_dict, to_dict
from gentrace.core.errors import ConfigError, GentraceError, StoreError, TrainingDiverged
from gentrace.core.schedules import Timeline
from gentrace.record.base import Batch, DivergenceWatch, RunContext, StepInfo
from gentrace.record.recorder import Recorder
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.store.writer import StoreWriter, create_store
from gentrace.task import plugins
from gentrace.task.checkpoint import TrainingState, pack
from gentrace.task.data import Dataset, from_splits
from gentrace.task.losses import LossName, sample_error
from gentrace.task.models import build_model
from gentrace.training.run import held_interrupts, reopen, run_attrs, static_arrays, to_device

STATE_FORMAT = "gentrace.Run/1"
LOSSES = ("auto", "cross_entropy", "bce", "mse")

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RunMisuse(GentraceError):
    """gentrace.Run used in a way it cannot record (the message says how to fix the call)."""


def _record_table(record: Mapping[str, Any] | str | Path | None) -> RecordConfig:
    """The [record] table from a dict, a TOML file (its [record] table, or the whole file), or the defaults."""
    if record is None:
        return RecordConfig()
    if isinstance(record, str | Path):
        import tomllib

        path = Path(record)
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"record = {str(path)!r}: cannot read it ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"record = {str(path)!r} is not valid TOML ({exc})") from None
        record = raw.get("record", raw)
    if not isinstance(record, Mapping):
        raise ConfigError(f"record must be a dict, a TOML path or None, got {type(record).__name__}")
    return from_dict({"record": dict(record)}).record


def _models(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    models = [model] if isinstance(model, nn.Module) else list(model)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ConfigError("model must be a torch.nn.Module or a non-empty list of them")
    shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in models]
    if not shapes[0]:
        raise ConfigError(f"model: this {type(models[0]).__name__} has no parameters; there is nothing to record")
    for i, other in enumerate(shapes[1:], start=1):
        if other != shapes[0]:
            raise ConfigError(f"model[{i}] has other parameters than model[0]; the models must share one architecture")
    for m in models:
        for module in m.modules():
            if isinstance(module, nn.ReLU | nn.LeakyReLU | nn.ELU | nn.SiLU):
                module.inplace = False  # the activation hooks must see the tensor as the module made it
    return models


def _device(models: list[nn.Module]) -> torch.device:
    devices = {p.device for m in models for p in m.parameters()}
    if len(devices) != 1:
        raise ConfigError(f"model: the parameters live on several devices ({sorted(map(str, devices))}); use one")
    return devices.pop()


def _loss_kind(loss: str | PerSampleLoss, data: Dataset, width: int) -> tuple[LossName, PerSampleLoss | None]:
    """The loss name that says how outputs are read, and the user's callable (None for a named loss)."""
    if callable(loss):
        if data.num_classes == 0:
            return "mse", loss
        return ("cross_entropy" if width > 1 else "bce"), loss
    if loss not in LOSSES:
        raise ConfigError(f"loss = {loss!r} is not known; use one of {', '.join(LOSSES)} or a per-sample callable")
    if loss == "auto":
        return ("mse" if data.num_classes == 0 else "cross_entropy"), None
    if loss != "mse" and data.num_classes == 0:
        raise ConfigError(f"loss = {loss!r} needs integer class labels; the train set's labels are floats")
    if loss == "cross_entropy" and width < data.num_classes:
        raise ConfigError(
            f"loss = 'cross_entropy': the model has {width} outputs but the labels reach {data.num_classes - 1}"
        )
    if loss in ("bce", "mse") and width != 1:
        raise ConfigError(f"loss = {loss!r} reads one output; the model has {width}")
    return loss, None  # type: ignore[return-value]


def _width(model: nn.Module, x: torch.Tensor) -> int:
    """Output units of `model`, from one sample in eval mode (no grad, so no state changes)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1])
    finally:
        model.train(was)
    if not torch.is_tensor(out) or out.ndim not in (1, 2):
        raise ConfigError(
            f"model: its forward returns {type(out).__name__}"
            + (f" of shape {tuple(out.shape)}" if torch.is_tensor(out) else "")
            + "; gentrace reads outputs [batch, outputs] (or [batch])"
        )
    return 1 if out.ndim == 1 else int(out.shape[1])


class Run:
    """Record a training loop you write yourself into a gentrace store (see the module docstring).

    Args:
        out: the store path (`.zarr`).
        model: the model, or a list of M models trained side by side (then osgr works).
        train: what the probes evaluate on as training data: an (x, y) pair of tensors or arrays, or a
            map-style Dataset of (x, y) items (the un-augmented set, not the loader); a list of M such
            sets gives each model its own.
        test: the test set, in the same forms.
        loss: `cross_entropy`, `bce`, `mse`, `auto`, or a per-sample loss `fn(outputs, y) -> [b]`
            (then outputs are read as class logits, one logit or values from the labels and the width).
        record: the [record] table (dict, TOML path, or None for the defaults).
        steps_per_epoch: optimizer steps per epoch (`len(loader)`).
        epochs: planned epochs; the arrays are preallocated for them and grow if the loop goes on
            (None: grow from one epoch).
        optimizer: the optimizer; the lr of every step is read from it.
        lr: the learning rate when no optimizer is given (a constant).
        reduction: how the loss the user backpropagates combines per-sample losses: mean or sum.
        factory: `package.module:function` building the same network as `function(input_shape,
            num_outputs, **factory_options)`; stored, so `gentrace analyze lipschitz` can rebuild it.
        on_nan: `raise` (default: TrainingDiverged, store `diverged`) or `continue` (record on; the
            finished store is marked `diverged`).
        resume: continue the store from the state `load_state_dict` is given.
        overwrite: replace an existing store.
        recorded_by: what the store says recorded it (the Lightning callback says so).
    """

    def __init__(
        self,
        out: str | Path,
        model: nn.Module | Sequence[nn.Module],
        *,
        train: object,
        test: object,
        loss: str | PerSampleLoss = "cross_entropy",
        record: Mapping[str, Any] | str | Path | None = None,
        steps_per_epoch: int,
        epochs: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        reduction: Literal["mean", "sum"] = "mean",
        factory: str | None = None,
        factory_options: Mapping[str, Any] | None = None,
        on_nan: Literal["raise", "continue"] = "raise",
        resume: bool = False,
        overwrite: bool = False,
        recorded_by: str = "gentrace.Run",
    ) -> None:
        self.path = Path(out)
        if resume and overwrite:
            raise ConfigError("resume=True and overwrite=True contradict each other; choose one")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch = {steps_per_epoch!r}: give the optimizer steps per epoch (>= 1)")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ConfigError(f"epochs = {epochs!r}: give the planned epochs (>= 1) or None")
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction = {reduction!r}: the loss must be the mean or the sum of per-sample losses")
        if on_nan not in ("raise", "continue"):
            raise ConfigError(f"on_nan = {on_nan!r}: use 'raise' or 'continue'")
        if optimizer is None and lr is None:
            raise ConfigError("pass optimizer= (its lr is read at every step) or lr= (a constant learning rate)")
        self.models = _models(model)
        self.device = _device(self.models)
        self.optimizer = optimizer
        self.reduction = reduction
        self.on_nan = on_nan
        self.resume = resume
        self.overwrite = overwrite
        rec = _record_table(record)
        data = from_splits(train, test, len(self.models), "gentrace.Run")
        self.n_train = int(data.x_train.shape[1])
        width = _width(self.models[0], data.x_train[0].to(self.device))
        self.kind, loss_fn = _loss_kind(loss, data, width)
        if loss_fn is not None and self.kind != "cross_entropy" and rec.lipschitz_fine.every_steps:
            raise ConfigError(
                "record.lipschitz_fine with a one-output loss given as a callable: the constant is read from "
                "the loss's derivative, known only for bce and mse; name the loss or turn lipschitz_fine off"
            )
        num_classes = width if self.kind == "cross_entropy" else (2 if self.kind == "bce" else 0)
        data = dataclasses.replace(data, num_classes=max(num_classes, data.num_classes) if num_classes else 0)
        self.data = to_device(data, self.device)
        self.factory = self._check_factory(factory, dict(factory_options or {}), width)
        lr0 = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float(lr or 0.0)
        self.timeline = Timeline(steps_per_epoch, epochs or 1)
        self.cfg = self._config(rec, lr0)
        self.ctx = RunContext(rec, self.data, self.models, self.kind, self.timeline, self.device, lr0, loss_fn=loss_fn)
        self.recorder = Recorder(self.ctx, checkpointer=self)
        self.loss_name = getattr(loss, "__qualname__", repr(loss)) if callable(loss) else str(loss)
        self.recorded_by = recorded_by
        self._const_lr = lr
        self.step_count = 0
        self._active = False
        self._probing = False
        self._writer: StoreWriter | None = None
        self._handles: list[RemovableHandle] = []
        self._resume_state: dict[str, Any] | None = None
        self._diverged_at: int | None = None
        self._watch = DivergenceWatch(len(self.models), self.device)
        self._params = [list(m.parameters()) for m in self.models]
        self._shapes = [[p.shape for p in ps] for ps in self._params]
        self._names = [n for n, _ in self.models[0].named_parameters()]
        self._reset_batch()
        self._lr_used: float | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def _check_factory(self, factory: str | None, options: dict[str, Any], width: int) -> str | None:
        """A model factory must build this architecture: the same parameter names and shapes."""
        if factory is None:
            if options:
                raise ConfigError("factory_options applies to a factory; pass factory='package.module:function' too")
            return None
        if not plugins.is_factory(factory):
            raise ConfigError(
                f"factory = {factory!r}: expected 'package.module:function' or 'path/to/file.py:function'"
            )
        self.factory_options = options
        built = build_model(ModelConfig(arch=factory, options=options, init="default"), self.data.input_shape, width)
        want = [(n, tuple(p.shape)) for n, p in self.models[0].named_parameters()]
        got = [(n, tuple(p.shape)) for n, p in built.named_parameters()]
        if want != got:
            counts = f"{len(want)} tensors vs {len(got)}"
            diff = next((f"{a} vs {b}" for a, b in zip(want, got, strict=False) if a != b), counts)
            raise ConfigError(
                f"factory = {factory!r} builds another network than the model given (parameter {diff}); "
                "it must return the same architecture"
            )
        return factory

    def _config(self, rec: RecordConfig, lr0: float) -> RunConfig:
        """The store's config: the [record] table and what is known of the run; data and model are `own`."""
        data = self.data
        optimizer = self.optimizer
        momentum = float(optimizer.param_groups[0].get("momentum", 0.0) or 0.0) if optimizer is not None else 0.0
        decay = float(optimizer.param_groups[0].get("weight_decay", 0.0) or 0.0) if optimizer is not None else 0.0
        model = (
            ModelConfig(arch=self.factory, options=self.factory_options, init="default")
            if self.factory
            else ModelConfig(arch=OWN, init="default")
        )
        cfg = RunConfig(
            name=self.path.stem,
            data=DataConfig(name=OWN, n_train=self.n_train, n_test=int(data.x_test.shape[0])),
            model=model,
            train=TrainConfig(
                optimizer="own",
                lr=lr0,
                momentum=min(max(momentum, 0.0), 1.0),
                weight_decay=max(decay, 0.0),
                batch_size=math.ceil(self.n_train / self.timeline.steps_per_epoch),
                epochs=self.timeline.epochs,
                loss=self.kind,
                replicates=len(self.models),
            ),
            record=rec,
        )
        return from_dict(to_dict(cfg))  # what a reader of the store will parse

    def _attrs(self) -> dict[str, Any]:
        """`gentrace record`'s attributes (training.run.run_attrs) and what the user's loop is made of."""
        optimizer = type(self.optimizer).__name__ if self.optimizer is not None else None
        own = {"recorded_by": self.recorded_by, "optimizer": optimizer, "loss": self.loss_name}
        attrs = run_attrs(self.cfg, self.data, self.device, self.kind, self.timeline)
        return attrs | {"own_loop": own | {"reduction": self.reduction}}

    # -- the Checkpointer the params probe asks (the store's own checkpoints: models and probe state) --
    def checkpoint(self, extra: dict[str, Any]) -> bytes:
        """The models' state at this step (buffers included: replays of BatchNorm nets read them)."""
        return pack(
            TrainingState(
                step=self.step_count,
                epoch=self.timeline.epoch_of(self.step_count),
                models=[m.state_dict() for m in self.models],
                optimizer={},  # the user's loop owns the optimizer and its checkpoints
                rng_cpu=torch.get_rng_state(),
                rng_cuda=[],
                extra=extra,
            )
        )

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the user's checkpoint must hold to resume this store at this step (tensors and numbers only).

        Waits until the store holds every row up to this step, so a checkpoint never names rows the
        store lacks.
        """
        self._require_active("run.state_dict()")
        self.recorder.flush()
        assert self._writer is not None
        self._writer.wait()
        buffer = io.BytesIO()
        torch.save(self.recorder.state(), buffer)
        return {
            "format": STATE_FORMAT,
            "step": self.step_count,
            "epochs": self.timeline.epochs,
            "n_train": self.n_train,
            "probes": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (a `state_dict()` saved in the user's checkpoint); call it before `with run:`."""
        if self._active:
            raise RunMisuse("run.load_state_dict() inside `with run:`; call it before entering the run")
        if not self.resume:
            raise RunMisuse("run.load_state_dict(): construct the run with resume=True to continue its store")
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise RunMisuse("run.load_state_dict(): this is not a gentrace.Run state_dict (saved by run.state_dict())")
        if int(state["n_train"]) != self.n_train:
            raise RunMisuse(
                f"run.load_state_dict(): the checkpoint was taken with a train set of {int(state['n_train'])} samples, "
                f"this run has {self.n_train}; pass the train set the store was recorded with"
            )
        self._resume_state = dict(state)

    def _reopen(self) -> StoreWriter:
        """Cut every stream of the store back to the rows at or before the saved step; returns its writer."""
        state = self._resume_state
        if state is None:
            raise RunMisuse(
                "resume=True: call run.load_state_dict(saved) with the state your checkpoint holds before `with run:`"
            )
        step = int(state["step"])
        if not self.path.exists():
            raise StoreError(f"{self.path} does not exist; resume continues a store (start it with resume=False)")
        reader = StoreReader(self.path, check_checkpoint=False)
        own = reader.attrs.get("own_loop")
        if not isinstance(own, dict):
            raise StoreError(
                f"{self.path} was recorded by `gentrace record`; continue it with `gentrace record --resume`"
            )
        stored = from_dict(reader.config)
        if int(stored.data.n_train) != self.n_train:
            raise RunMisuse(
                f"resume: the store {self.path} was recorded with a train set of {stored.data.n_train} samples, "
                f"this run has {self.n_train}; pass the same train set"
            )
        if to_dict(stored.record) != to_dict(self.cfg.record):
            raise RunMisuse(f"resume: the record table differs from the store's ({self.path}); pass the same record")
        if int(state["epochs"]) > self.timeline.epochs:
            self._grow(int(state["epochs"]))
        keep = {s: int((reader.array(schema.step_of(s)) <= step).sum()) for s in reader.streams()}
        saved = [s for s in reader.checkpoint_steps() if s <= step]
        probes = torch.load(io.BytesIO(state["probes"].numpy().tobytes()), weights_only=False)
        self.recorder.load_state(probes)
        writer = reopen(self.path, keep, self.recorder, saved[-1] if saved else None, upto=step)
        self.recorder.resume(keep)
        self.step_count = step
        return writer

    # -- the with block -------------------------------------------------------------------------
    def __enter__(self) -> Run:
        if self._active:
            raise RunMisuse("`with run:` entered twice; a Run records one loop")
        with held_interrupts() as held:
            if self.resume:
                writer = self._reopen()
            else:
                static = {**static_arrays(self.data, self.cfg.record), **self.recorder.static()}
                writer = create_store(
                    self.path, self._attrs(), self.recorder.streams(), static, overwrite=self.overwrite
                )
        writer.resume_hint = "gentrace.Run(..., resume=True) and run.load_state_dict() from your checkpoint"
        if held.pending:
            writer.close("interrupted")
            raise KeyboardInterrupt
        self._writer = writer
        self.recorder.attach(writer)
        self.recorder.__enter__()
        self._install()
        self._active = True
        if not self.resume:
            self._probe(0)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.recorder.__exit__(exc_type, exc, tb)
        writer = self._writer
        assert writer is not None
        if exc_type is None:
            try:
                self._check_divergence(self._lr_used or 0.0)
            except TrainingDiverged:
                with contextlib.suppress(Exception):
                    self.recorder.flush()
                writer.close_after_failure("diverged")
                raise
            with held_interrupts() as held:
                self.recorder.flush()
                status = "diverged" if self._diverged_at is not None else "complete"
                writer.close(
                    status,
                    final_status=lambda s: "interrupted" if held.pending else s,
                    attrs=self._final_attrs(),
                )
            if held.pending:
                raise KeyboardInterrupt
            return
        if issubclass(exc_type, KeyboardInterrupt):
            with held_interrupts():
                try:
                    self.recorder.flush()
                finally:
                    writer.close_after_failure("interrupted")
        elif issubclass(exc_type, TrainingDiverged):
            try:
                self.recorder.flush()  # the loss history up to the divergence is what a user looks at
            finally:
                writer.close_after_failure("diverged")
        else:
            # the user's code failed, not the store's: keep the buffered rows when the writer still takes them
            with contextlib.suppress(Exception):
                self.recorder.flush()
            writer.close_after_failure("failed")

    def _final_attrs(self) -> dict[str, Any]:
        """The steps the loop really took (it may stop early or go on past `epochs`)."""
        epochs = max(1, math.ceil(self.step_count / self.timeline.steps_per_epoch))
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, epochs=epochs))
        extra = {"diverged_at_step": self._diverged_at} if self._diverged_at is not None else {}
        return {"config": to_dict(cfg), "total_steps": self.step_count} | extra

    # -- hooks ----------------------------------------------------------------------------------
    def _reset_batch(self) -> None:
        m = len(self.models)
        self._xs: list[torch.Tensor | None] = [None] * m
        self._outs: list[torch.Tensor | None] = [None] * m
        self._forwards = [0] * m  # training forwards of each model since the last step
        self._batch: Batch | None = None

    def _training_forward(self, model: nn.Module) -> bool:
        return self._active and not self._probing and model.training and torch.is_grad_enabled()

    def _install(self) -> None:
        for m, model in enumerate(self.models):
            self._handles.append(model.register_forward_pre_hook(self._pre_hook(m)))
            self._handles.append(model.register_forward_hook(self._post_hook(m)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._lr_hook))

    def _pre_hook(self, m: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self._training_forward(module) or not args or not torch.is_tensor(args[0]):
                return None
            self._forwards[m] += 1
            if self._forwards[m] > 1 and self.cfg.record.grad_moments.source == "train-batches":
                raise RunMisuse(
                    f"step {self.step_count + 1}: the model ran {self._forwards[m]} training forwards in one step; "
                    "train-batches gradient moments need one forward per optimizer step (no gradient "
                    'accumulation): use record.grad_moments.source = "probe"'
                )
            if self.step_count + 1 > self.timeline.total_steps:  # the loop goes on past its planned epochs
                self._grow(math.ceil((self.step_count + 1) / self.timeline.steps_per_epoch))
            x = args[0]
            if self.recorder.wants_input_grad(self.step_count + 1) and x.is_floating_point():
                x = x.detach().requires_grad_(True)  # a leaf: the backward leaves dL/dx in x.grad
            self._xs[m] = x
            return (x, *args[1:])

        return hook

    def _post_hook(self, m: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._training_forward(module) or self._xs[m] is None:
                return
            if not torch.is_tensor(output):
                raise RunMisuse(
                    f"the model's forward returned {type(output).__name__}; gentrace.Run reads a tensor of outputs"
                )
            self._outs[m] = output
            if m == len(self.models) - 1 and all(o is not None for o in self._outs):
                xs = [x for x in self._xs if x is not None]
                outs = [o for o in self._outs if o is not None]
                weight = None if self.reduction == "mean" else 1.0
                self._batch = Batch(self.step_count + 1, xs, outs, None, sample_weight=weight)
                self.recorder.before_backward(self._batch)

        return hook

    def _lr_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._lr_used = float(optimizer.param_groups[0]["lr"])

    # -- per step -------------------------------------------------------------------------------
    def _require_active(self, what: str) -> None:
        if not self._active:
            raise RunMisuse(f"{what} outside `with run:`; put the training loop inside `with run:`")

    def step(self, loss: torch.Tensor | Sequence[Any] | float | None = None, y: Any = None) -> None:
        """Call once after every `optimizer.step()`.

        Args:
            loss: the batch's loss as backpropagated (a scalar, or M of them for M models); None: the
                mean per-sample loss of the outputs the hooks saw and `y`.
            y: the batch's targets [b] (or M of them); needed for the batch error, for `loss=None`
                and for the one-output Lipschitz constant.

        Raises:
            TrainingDiverged: the loss is not finite (unless on_nan="continue").
            RunMisuse: outside the `with` block, a gradient accumulation under train-batches moments,
                or a model whose parameters changed shape.
        """
        self._require_active("run.step()")
        step = self.step_count + 1
        batch = self._batch
        self._reset_batch()
        self._check_shapes(step)
        targets = self._targets(y, batch)
        losses, errors = self._summary(loss, batch, targets)
        size = batch.size if batch is not None else (int(targets.shape[1]) if targets is not None else 0)
        self.step_count = step
        if step > self.timeline.total_steps:
            self._grow(math.ceil(step / self.timeline.steps_per_epoch))
        lr = self._lr()
        if loss is not None or (batch is not None and targets is not None):
            self._watch.note(step, losses)
        if self.recorder.syncs_at(step):  # before anything of this step is recorded: one read back, not per step
            self._check_divergence(lr)
        if batch is not None and targets is not None:
            batch.y = targets
            self.recorder.after_backward(batch)
        epoch = (step - 1) // self.timeline.steps_per_epoch
        self.recorder.after_step(StepInfo(step, epoch, lr, losses, errors, size))
        self._probe(step)

    def _check_divergence(self, lr: float) -> None:
        """A non-finite loss noted since the last check: its rows are dropped; raise, or record on (on_nan)."""
        if self._diverged_at is not None:
            return  # already found, and on_nan = "continue"
        found = self._watch.first()
        if found is None:
            return
        self._diverged_at = found[0]
        if self.on_nan == "raise":
            self.recorder.drop_from(found[0])
            fix = f"lower the learning rate (now {lr:g}), or pass on_nan='continue' to record on"
            raise self._watch.error(found, "model", fix)

    def _probe(self, step: int) -> None:
        """The probes' scheduled work at `step`, outside the user's autocast and no-grad contexts."""
        self._probing = True
        try:
            with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
                self.recorder.at_step(step, self.timeline.epoch_of(step))
        finally:
            self._probing = False

    def _grow(self, epochs: int) -> None:
        """The loop goes on past the planned steps: the probes follow the longer timeline, the arrays grow."""
        self.timeline = Timeline(self.timeline.steps_per_epoch, epochs)
        self.recorder.extend(self.timeline)

    def _lr(self) -> float:
        if self._lr_used is not None:
            lr, self._lr_used = self._lr_used, None
            return lr
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return float(self._const_lr or 0.0)

    def _check_shapes(self, step: int) -> None:
        for params, shapes in zip(self._params, self._shapes, strict=True):
            for p, shape, name in zip(params, shapes, self._names, strict=True):
                if p.shape != shape:
                    raise RunMisuse(
                        f"step {step}: parameter {name} changed shape from {tuple(shape)} to {tuple(p.shape)}; "
                        "gentrace records a fixed architecture: start a new store for the new shape"
                    )
        if step % self.timeline.steps_per_epoch == 0:
            names = [n for n, _ in self.models[0].named_parameters()]
            if names != self._names:
                raise RunMisuse(
                    f"step {step}: the model's parameters changed (now {len(names)} tensors, were {len(self._names)}); "
                    "gentrace records a fixed architecture: start a new store for the new model"
                )

    def _targets(self, y: Any, batch: Batch | None) -> torch.Tensor | None:
        """[M, b] targets on the device, or None."""
        if y is None:
            return None
        m = len(self.models)
        ys = list(y) if isinstance(y, list | tuple) and len(y) == m and m > 1 else [y] * m
        stacked = torch.stack([torch.as_tensor(v).to(self.device).reshape(-1) for v in ys])
        if batch is not None and stacked.shape[1] != batch.size:
            raise RunMisuse(f"run.step(y=...): {stacked.shape[1]} targets for a batch of {batch.size} samples")
        if self.kind != "mse":
            stacked = stacked.long()
        return stacked

    def _summary(
        self, loss: Any, batch: Batch | None, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch loss and batch error [M] of this step, float32 on the device (NaN where neither was handed over)."""
        m = len(self.models)
        nan = torch.full((m,), float("nan"), device=self.device)
        with torch.no_grad():
            computed = None
            if batch is not None and targets is not None:
                fn = self.ctx.per_sample_loss()
                outs = [o.detach().float() for o in batch.outputs]
                per_loss = torch.stack([fn(o, targets[i]).mean() for i, o in enumerate(outs)])
                per_error = torch.stack([sample_error(o, targets[i], self.kind).mean() for i, o in enumerate(outs)])
                computed = (per_loss.float(), per_error.float())
            if loss is None:
                return computed if computed is not None else (nan, nan.clone())
            values = self._loss_values(loss)
            scale = 1.0 if self.reduction == "mean" else 1.0 / max(batch.size if batch is not None else 1, 1)
            return values * scale, (computed[1] if computed is not None else nan.clone())

    def _loss_values(self, loss: Any) -> torch.Tensor:
        """The losses handed to `step` as [M] float32 on the device (one scalar per model; nothing read back)."""
        m = len(self.models)
        parts = list(loss) if isinstance(loss, list | tuple) else [loss]
        pieces = [
            (p.detach() if torch.is_tensor(p) else torch.tensor(float(p))).to(self.device, torch.float32).reshape(-1)
            for p in parts
        ]
        values = torch.cat(pieces)
        if values.numel() == 1 and m > 1:
            raise RunMisuse(
                f"run.step(loss): one loss for {m} models; hand over each model's loss (a list) or y= instead"
            )
        if values.numel() != m:
            raise RunMisuse(f"run.step(loss): {values.numel()} losses for {m} models")
        return values
