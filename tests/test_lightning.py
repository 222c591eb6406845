"""gentrace.lightning.GentraceCallback: a LightningModule fitted by lightning.Trainer, recorded on CPU.

The fit uses the Trainer's network, data order (a batch sampler of Trainer.order), SGD and seed on
digits, so its store equals `gentrace record`'s array by array; an exception in the fit marks the
store failed. The suite installs the `lightning` extra, so these tests run everywhere.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import store_attrs
from lightning.pytorch.callbacks import ModelCheckpoint
from test_own_loop import assert_same_stores, python
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from gentrace.core import config
from gentrace.lightning import GentraceCallback
from gentrace.store.reader import StoreReader
from gentrace.task.data import build_data
from gentrace.task.models import build_model
from gentrace.training.loop import Trainer
from gentrace.training.run import record

SETS = [
    "data.n_train=150",
    "data.n_test=80",
    "model.hidden=[16]",
    "train.lr=0.05",
    "train.momentum=0.9",
    "train.batch_size=50",
    "train.epochs=2",
    "train.replicates=1",
    "train.lr_decay={every_epochs=0}",
    "record.checkpoint_every_s=0",
    "record.eval_every_steps=1",
    "record.lipschitz_fine.every_steps=2",
    "record.grad_moments.every_steps=2",
]


class Wrapped(pl.LightningModule):
    """The Trainer's network as a LightningModule: its layers registered under the same names (`0`, `1`, ...)."""

    def __init__(self, net: nn.Module, lr: float, momentum: float, fail_at: int = 0) -> None:
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)
        self.lr, self.momentum, self.fail_at = lr, momentum, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # as gentrace's MLP does
        for child in self.children():
            x = child(x)
        return x

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.fail_at and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class TrainerOrder(Sampler[list[int]]):
    """Batches in the order of gentrace's Trainer (`Trainer.order(epoch)`), one epoch per iteration."""

    def __init__(self, trainer: Trainer, batch: int) -> None:
        self.trainer, self.batch, self.epoch = trainer, batch, 0

    def __iter__(self) -> Iterator[list[int]]:
        order = self.trainer.order(self.epoch)[0].tolist()
        self.epoch += 1
        for start in range(0, len(order), self.batch):
            yield order[start : start + self.batch]

    def __len__(self) -> int:
        return math.ceil(self.trainer.cfg.data.n_train / self.batch)


def fit(
    cfg: config.RunConfig,
    out: Path,
    fail_at: int = 0,
    checkpoints: Path | None = None,
    ckpt_path: Path | None = None,
) -> None:
    """Fit the Trainer's network with Lightning; `checkpoints`: save one each epoch there; `ckpt_path`: resume."""
    data = build_data(cfg.data, 1)
    net = build_model(cfg.model, data.input_shape, data.num_classes)
    module = Wrapped(copy.deepcopy(net), cfg.train.lr, cfg.train.momentum, fail_at)
    order = Trainer(cfg, data, [copy.deepcopy(net)])
    train = TensorDataset(data.x_train[0], data.y_train[0])
    test = TensorDataset(data.x_test, data.y_test)
    callbacks: list[pl.Callback] = [GentraceCallback(out, config.to_dict(cfg.record), test=test)]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1))
    trainer = pl.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=checkpoints is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    sampler = TrainerOrder(order, cfg.train.batch_size)
    if ckpt_path is not None:
        sampler.epoch = int(torch.load(ckpt_path, weights_only=False)["epoch"]) + 1
    trainer.fit(module, DataLoader(train, batch_sampler=sampler), ckpt_path=ckpt_path)


def test_lightning_fit_store_equals_gentrace_record(tmp_path: Path) -> None:
    cfg = config.load(None, SETS)
    reference = record(cfg, tmp_path / "record.zarr", device="cpu")
    fit(cfg, tmp_path / "lightning.zarr")
    assert_same_stores(reference, tmp_path / "lightning.zarr")
    attrs = store_attrs(tmp_path / "lightning.zarr")
    assert attrs["own_loop"]["recorded_by"] == "gentrace.lightning"
    assert attrs["status"] == "complete"


def test_a_fit_resumed_from_a_lightning_checkpoint_continues_the_store(tmp_path: Path) -> None:
    cfg = config.load(None, SETS)
    fit(cfg, tmp_path / "whole.zarr")
    # a first fit that fails in its second epoch, with Lightning's checkpoints, then a fit resumed from one
    with pytest.raises(RuntimeError, match="boom"):
        fit(cfg, tmp_path / "resumed.zarr", fail_at=5, checkpoints=tmp_path / "ckpt")
    assert store_attrs(tmp_path / "resumed.zarr")["status"] == "failed"
    (saved,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    fit(cfg, tmp_path / "resumed.zarr", ckpt_path=saved)
    assert store_attrs(tmp_path / "resumed.zarr")["status"] == "complete"
    assert_same_stores(tmp_path / "whole.zarr", tmp_path / "resumed.zarr")


def test_an_exception_in_the_fit_marks_the_store_failed(tmp_path: Path) -> None:
    cfg = config.load(None, SETS)
    with pytest.raises(RuntimeError, match="boom"):
        fit(cfg, tmp_path / "lightning.zarr", fail_at=4)
    assert store_attrs(tmp_path / "lightning.zarr")["status"] == "failed"
    assert StoreReader(tmp_path / "lightning.zarr").committed("metrics_fine") == 4  # layout: not a store name (check)


def test_the_lightning_example_runs_and_every_stream_is_there(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "lightning_digits.py"
    done = python(example, tmp_path / "lit.zarr")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "lit.zarr")
    reader = StoreReader(tmp_path / "lit.zarr")
    assert reader.status == "complete"
    assert {"metrics", "metrics_fine", "params", "params_fine", "preds", "grad", "acts"} <= set(reader.streams())
