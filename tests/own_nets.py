"""A user's own network for the gentrace.Run tests: a factory `small_cnn(input_shape, num_outputs)`."""

from __future__ import annotations

from torch import nn


def small_cnn(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """conv 3x3 (4 channels) -> ReLU -> 2x2 max pool -> linear: a CNN for 8x8 digits."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * (height // 2) * (width // 2), num_outputs),
    )
