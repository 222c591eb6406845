"""Losses, predictions and errors shared by training and recording (no storage, no schedules).

Model outputs are [B, C] logits for cross-entropy, [B] logits for bce (one output unit) and [B]
values for mse (one output unit); `output_dim` says how many units the last layer needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

LossName = Literal["cross_entropy", "bce", "mse"]


def resolve_loss(loss: str, num_classes: int) -> LossName:
    """`auto` -> cross_entropy for classes, mse for regression (num_classes 0)."""
    if loss == "auto":
        return "mse" if num_classes == 0 else "cross_entropy"
    assert loss in ("cross_entropy", "bce", "mse")
    return loss  # type: ignore[return-value]


def output_dim(loss: LossName, num_classes: int) -> int:
    """Units of the model's last layer for this loss."""
    return num_classes if loss == "cross_entropy" else 1


def per_sample_loss(loss: LossName) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss of each sample alone: (out, y) -> [B] (training uses its mean over the batch)."""
    if loss == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    if loss == "bce":
        return lambda out, y: F.binary_cross_entropy_with_logits(out.squeeze(-1), y.to(out.dtype), reduction="none")
    return lambda out, y: F.mse_loss(out.squeeze(-1), y.to(out.dtype), reduction="none")


def predict(out: torch.Tensor, loss: LossName) -> torch.Tensor:
    """Predicted class [B] int64 (or the real output [B] for mse)."""
    if loss == "cross_entropy":
        return out.argmax(dim=-1)
    if loss == "bce":
        return (out.squeeze(-1) > 0).long()
    return out.squeeze(-1)


def sample_error(out: torch.Tensor, y: torch.Tensor, loss: LossName) -> torch.Tensor:
    """Per-sample error [B] of the BTH paper: |y - f(x)| for regression, 1 - p(correct class) otherwise."""
    if loss == "cross_entropy":
        return 1.0 - out.softmax(dim=-1).gather(-1, y[:, None]).squeeze(-1)
    if loss == "bce":
        p1 = torch.sigmoid(out.squeeze(-1))
        return torch.where(y.bool(), 1.0 - p1, p1)
    return (out.squeeze(-1) - y).abs()


def correct(out: torch.Tensor, y: torch.Tensor, loss: LossName) -> torch.Tensor:
    """Per-sample 0/1 correctness [B] float (NaN for regression, which has no accuracy)."""
    if loss == "mse":
        return torch.full(y.shape, float("nan"), device=y.device)
    return (predict(out, loss) == y).float()
