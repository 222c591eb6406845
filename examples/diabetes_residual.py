"""Regression with your own model and data: scikit-learn's bundled diabetes set and a residual MLP.

Both factories live in this one file:
- `data.name = "diabetes_residual.py:diabetes"`: 442 patients, 10 standardized features, the disease
  progression one year later as a float target (standardized): float targets make it a regression run
  (loss mse). A seeded shuffle puts 342 in the train split and 100 in the test split.
- `model.arch = "diabetes_residual.py:residual_mlp"`: x -> Linear -> `blocks` x (x + Linear(SiLU(Linear(x))))
  -> Linear: not a Sequential, its gates are SiLU (`record.activations.layers = "gates"`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def diabetes(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Gentrace's data factory signature: `(**data.options) -> (train, test)`, each split an (x, y) pair."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)[order]
    y = ((y - y.mean()) / y.std()).astype(np.float32)[order]
    return (x[:342], y[:342]), (x[342:], y[342:])


class Residual(nn.Module):
    """x + W2 SiLU(W1 x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.gate = nn.SiLU()
        self.outer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, width] -> [B, width]`."""
        return x + self.outer(self.gate(self.inner(x)))


class ResidualMLP(nn.Module):
    """`[B, d] -> [B, num_outputs]`: an input layer, residual blocks, an output layer."""

    def __init__(self, d: int, num_outputs: int, width: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(Residual(width) for _ in range(blocks))
        self.out = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten, embed, add each block's residual, read out."""
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def residual_mlp(input_shape: tuple[int, ...], num_outputs: int, width: int = 32, blocks: int = 2) -> nn.Module:
    """Gentrace's model factory signature: `(input_shape, num_outputs, **model.options) -> nn.Module`."""
    return ResidualMLP(int(np.prod(input_shape)), num_outputs, width, blocks)
