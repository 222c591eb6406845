"""Record a PyTorch Lightning fit with gentrace: an MLP on scikit-learn's 8x8 digits, 2 epochs.

    pip install 'gentrace[lightning]'
    python examples/lightning_digits.py runs/lightning.zarr
    gentrace analyze gsnr runs/lightning.zarr

The LightningModule is ordinary: `training_step` calls `self(x)` and returns the loss. The callback
evaluates the probes on the datasets of the train and validation dataloaders.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gentrace.lightning import GentraceCallback


class DigitsMLP(pl.LightningModule):
    """64 -> 64 -> 10 with ReLU, SGD with momentum."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, 10]."""
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The batch's mean cross-entropy (what the callback records as the batch loss)."""
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The validation loss, logged."""
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum; the callback reads its lr at every step."""
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def digits() -> tuple[TensorDataset, TensorDataset]:
    """600 training and 300 test digits, inputs scaled to [0, 1]."""
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return TensorDataset(x[:600], y[:600]), TensorDataset(x[600:900], y[600:900])


def main(out: str) -> None:
    """Fit two epochs with the callback; print the store path."""
    torch.manual_seed(0)
    train, test = digits()
    callback = GentraceCallback(out, record={"checkpoint_every_s": 0}, overwrite=True)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsMLP(), DataLoader(train, batch_size=50, shuffle=True), DataLoader(test, batch_size=300))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/lightning.zarr")
