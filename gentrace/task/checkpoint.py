"""The training-state checkpoint: the one definition of what `checkpoints/step-<step>` holds.

The store keeps each checkpoint as opaque bytes (gentrace.store.schema.checkpoint_array); this module
says what the bytes are: `torch.save` of one dict, written by the training loop (`Trainer.checkpoint`),
read back by `--resume` (`Trainer.restore`, after `check` picked an intact one) and by the offline
analyses that need state the parameter snapshots do not hold (BatchNorm running statistics:
gentrace.analyses.replay). Layout, in this key order (the order is part of the bytes):

    extra      dict     probe state to carry over (gentrace.record), {} when none
    step       int      optimizer steps taken
    epoch      int      completed epochs
    models     list     M replicate state dicts (parameters and buffers), replicate order
    optimizer  dict     the optimizer's state dict over all replicates' parameters
    rng_cpu    Tensor   torch's CPU generator state (dropout)
    rng_cuda   list     every CUDA generator's state, [] without CUDA
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

# keys a payload must have to be a training checkpoint at all (what resume has always checked)
REQUIRED = frozenset({"models", "optimizer", "step"})
NOT_A_CHECKPOINT = "not a gentrace training checkpoint"


@dataclass(eq=False)
class TrainingState:
    """Everything a run needs to continue exactly where it stopped (eq=False: fields hold tensors).

    Attributes:
        step: optimizer steps taken.
        epoch: completed epochs.
        models: `[M]` state dicts, one per replicate (parameters and buffers).
        optimizer: the optimizer's state dict.
        rng_cpu: `torch.get_rng_state()`.
        rng_cuda: `torch.cuda.get_rng_state_all()`, or [] without CUDA.
        extra: probe state (gentrace.record), {} when none.
    """

    step: int
    epoch: int
    models: list[dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: list[torch.Tensor] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def pack(state: TrainingState) -> bytes:
    """Serialize `state`: `torch.save` of the layout dict, keys in the module docstring's order."""
    layout: dict[str, Any] = {
        "extra": state.extra,
        "step": state.step,
        "epoch": state.epoch,
        "models": state.models,
        "optimizer": state.optimizer,
        "rng_cpu": state.rng_cpu,
        "rng_cuda": state.rng_cuda,
    }
    buffer = io.BytesIO()
    torch.save(layout, buffer)
    return buffer.getvalue()


def _load(payload: bytes, map_location: str | torch.device) -> dict[str, Any]:
    """The layout dict of `payload`; ValueError when it deserializes to something else."""
    # weights_only=False: the optimizer and probe state are arbitrary picklable objects; the payload
    # comes from the user's own store
    state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or not REQUIRED.issubset(state):
        raise ValueError(NOT_A_CHECKPOINT)
    return state


def check(payload: bytes) -> None:
    """Raise unless `payload` deserializes to a training checkpoint (any torch.load error, or ValueError)."""
    _load(payload, "cpu")


def unpack(payload: bytes, map_location: str | torch.device = "cpu") -> TrainingState:
    """The TrainingState serialized by `pack`, its tensors on `map_location`.

    Raises:
        ValueError: the payload is not a training checkpoint (another object, or a dict without the keys).
    """
    state = _load(payload, map_location)
    return TrainingState(
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        models=list(state["models"]),
        optimizer=state["optimizer"],
        rng_cpu=state["rng_cpu"],
        rng_cuda=list(state["rng_cuda"]),
        extra=dict(state.get("extra", {})),
    )
