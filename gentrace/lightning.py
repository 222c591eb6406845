"""PyTorch Lightning: `GentraceCallback` records a LightningModule fitted by `lightning.Trainer`.

    trainer = lightning.Trainer(max_epochs=E, callbacks=[GentraceCallback("runs/lit.zarr", record={...})])
    trainer.fit(module, datamodule=dm)

The callback is a `gentrace.Run` (gentrace.training.own_loop) opened when training starts and
closed when it ends (or marked `failed` / `interrupted` when Lightning reports an exception). It
reads from Lightning what a plain loop passes by hand: the module (its `forward` must be what
`training_step` calls, as `self(x)`), the first optimizer (its lr at every step), the training
batches per epoch and `max_epochs`; after every optimizer step it takes the loss `training_step`
returned and the batch's targets (`batch[1]`, or `batch["y"]` / `batch["label"]` of a dict batch).

The probes evaluate on `train` and `test` when given, else on the datasets of the train and
validation dataloaders (un-augmented sets are what the probes should see: pass them when the
loaders augment). Resume: the callback's state goes into Lightning's checkpoints
(`state_dict`); `trainer.fit(..., ckpt_path=...)` continues the store from the checkpoint's step
(rows recorded after it are dropped).

Install with `pip install 'gentrace[lightning]'`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the test suite installs the extra
    raise ImportError("gentrace.lightning needs PyTorch Lightning: pip install 'gentrace[lightning]'") from exc

from gentrace.core.errors import ConfigError
from gentrace.training.own_loop import PerSampleLoss, Run

__all__ = ["GentraceCallback"]


def _dataset(loaders: Any, which: str) -> Any:
    """The dataset of a dataloader (or of the first of several) Lightning holds."""
    if loaders is None:
        return None
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    dataset = getattr(loaders, "dataset", None)
    if dataset is None:
        raise ConfigError(f"GentraceCallback: the {which} dataloader has no dataset; pass {which}= to the callback")
    return dataset


def _targets(batch: Any) -> Any:
    """The targets of a training batch: batch[1] of a pair, or the `y` / `label` / `target` entry of a dict."""
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in ("y", "label", "labels", "target", "targets"):
            if key in batch:
                return batch[key]
    return None


class GentraceCallback(pl.Callback):
    """Record a Lightning fit into a gentrace store (see the module docstring).

    Args:
        out: the store path.
        record: the [record] table (dict, TOML path or None for the defaults).
        train: what the probes evaluate as training data (default: the train dataloader's dataset).
        test: the test data (default: the validation dataloader's dataset; one of the two is needed).
        loss: as gentrace.Run's `loss` (a name or a per-sample callable).
        reduction: how `training_step`'s loss combines per-sample losses (mean or sum).
        factory: `package.module:function` that builds the module's network (stored for the CLI).
        factory_options: the factory's keyword arguments.
        on_nan: `raise` or `continue`, as gentrace.Run.
        resume: continue the store (implied when Lightning restores the callback's state from `ckpt_path`).
        overwrite: replace an existing store.
    """

    def __init__(
        self,
        out: str | Path,
        record: Mapping[str, Any] | str | Path | None = None,
        *,
        train: object = None,
        test: object = None,
        loss: str | PerSampleLoss = "cross_entropy",
        reduction: Literal["mean", "sum"] = "mean",
        factory: str | None = None,
        factory_options: Mapping[str, Any] | None = None,
        on_nan: Literal["raise", "continue"] = "raise",
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.out = Path(out)
        self.options: dict[str, Any] = {
            "record": record,
            "loss": loss,
            "reduction": reduction,
            "factory": factory,
            "factory_options": factory_options,
            "on_nan": on_nan,
            "resume": resume,
            "overwrite": overwrite,
        }
        self.train, self.test = train, test
        self.run: Run | None = None
        self._saved: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the run: the module, its data, its first optimizer, Lightning's step grid."""
        train = self.train if self.train is not None else _dataset(trainer.train_dataloader, "train")
        test = self.test
        if test is None:
            loaders = trainer.val_dataloaders
            module = getattr(trainer, "datamodule", None)
            if loaders is None and module is not None and hasattr(module, "val_dataloader"):
                loaders = module.val_dataloader()
            test = _dataset(loaders, "test")
        if train is None or test is None:
            raise ConfigError("GentraceCallback: no validation dataloader to evaluate on; pass test= to the callback")
        if not trainer.optimizers:
            raise ConfigError("GentraceCallback: the module configures no optimizer; there is no training to record")
        steps = int(trainer.num_training_batches)
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        options = dict(self.options)
        if self._saved is not None:  # a fit resumed from a Lightning checkpoint continues the store
            options |= {"resume": True, "overwrite": False}
        self.run = Run(
            self.out,
            pl_module,
            train=train,
            test=test,
            steps_per_epoch=steps,
            epochs=max_epochs,
            optimizer=trainer.optimizers[0],
            recorded_by="gentrace.lightning",
            **options,
        )
        if self._saved is not None:
            self.run.load_state_dict(self._saved)
        self.run.__enter__()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the optimizer step: the loss `training_step` returned and the batch's targets."""
        if self.run is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.run.step(loss, _targets(batch))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the store `complete`."""
        run, self.run = self.run, None
        if run is not None:
            run.__exit__(None, None, None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Mark the store `failed`, `interrupted` or `diverged`; Lightning re-raises."""
        run, self.run = self.run, None
        if run is not None:
            run.__exit__(type(exception), exception, exception.__traceback__)

    def state_dict(self) -> dict[str, Any]:
        """The run's resume state, saved in Lightning's checkpoints ({} outside training)."""
        return self.run.state_dict() if self.run is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved state for `on_train_start` (a fit resumed with `ckpt_path`)."""
        self._saved = dict(state_dict) if state_dict else None
