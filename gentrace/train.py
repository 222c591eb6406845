"""The training loop: M replicates from one initialization, each on its own training subset.

The replicates are trained together: one optimizer over all of their parameters and one
backward pass of the summed batch losses (the gradient of sum_m L_m with respect to model m's
parameters is the gradient of L_m alone, so each replicate trains exactly as it would alone),
which saves M-1 backward launches and optimizer calls per step. Data order comes from a seed
per (model.seed, replicate, epoch), and the torch RNG (dropout) is saved in every checkpoint,
so a run resumed from a checkpoint reaches the same parameters as one never interrupted.

The loop calls the recorder at defined points and contains no storage code.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from gentrace.config import RunConfig
from gentrace.data import Dataset
from gentrace.errors import TrainingDiverged
from gentrace.losses import LossName, per_sample_loss, resolve_loss, sample_error
from gentrace.record.base import StepInfo
from gentrace.record.recorder import Recorder
from gentrace.schedules import Timeline, timeline


class StepObserver(Protocol):
    """Anything that wants to see each step (progress bars)."""

    def on_step(self, info: StepInfo) -> None:
        """Called after every optimizer step."""


class Trainer:
    """Owns the replicate models, their optimizer and the step counter."""

    def __init__(self, cfg: RunConfig, data: Dataset, models: Sequence[nn.Module]) -> None:
        self.cfg = cfg
        self.data = data
        self.models = list(models)
        self.loss: LossName = resolve_loss(cfg.train.loss, data.num_classes)
        self.timeline: Timeline = timeline(cfg.data.n_train, cfg.train.batch_size, cfg.train.epochs)
        n = cfg.data.n_train
        self.batch = n if cfg.train.batch_size == 0 else min(cfg.train.batch_size, n)
        trainable = [p for model in self.models for p in model.parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer: torch.optim.Optimizer
        if t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(trainable, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(trainable, lr=t.lr, weight_decay=t.weight_decay)
        self.step = 0
        self.epoch = 0
        self.restored = False
        torch.manual_seed(cfg.model.seed)

    def lr_at(self, epoch: int) -> float:
        """Step decay: lr * factor^(epoch // every_epochs)."""
        decay = self.cfg.train.lr_decay
        if decay.every_epochs == 0:
            return self.cfg.train.lr
        return self.cfg.train.lr * decay.factor ** (epoch // decay.every_epochs)

    def order(self, epoch: int) -> torch.Tensor:
        """Sample order of each replicate in `epoch`: [M, n] int64, from its own seed."""
        n = self.cfg.data.n_train
        perms = []
        for m in range(len(self.models)):
            seed = int(np.random.SeedSequence([self.cfg.model.seed, m, epoch]).generate_state(1)[0])
            perms.append(torch.randperm(n, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(perms).to(self.data.x_train.device)

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self, extra: dict[str, Any] | None = None) -> bytes:
        """Model, optimizer and RNG state at the current step (plus `extra`, e.g. probe state), serialized."""
        state: dict[str, Any] = {
            "extra": extra or {},
            "step": self.step,
            "epoch": self.epoch,
            "models": [model.state_dict() for model in self.models],
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def restore(self, payload: bytes) -> dict[str, Any]:
        """Continue from a checkpoint written by `checkpoint`; returns its `extra`."""
        state = torch.load(io.BytesIO(payload), map_location=self.data.x_train.device, weights_only=False)
        for model, model_state in zip(self.models, state["models"], strict=True):
            model.load_state_dict(model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.restored = True
        return dict(state.get("extra", {}))

    # -- the loop -------------------------------------------------------------------------------
    def run(self, recorder: Recorder, observers: Sequence[StepObserver] = ()) -> None:
        """Train from the current step to the end, recording as configured."""
        if not self.restored:
            recorder.at_step(0, 0)
        loss_fn = per_sample_loss(self.loss)
        x, y = self.data.x_train, self.data.y_train
        rows = torch.arange(len(self.models), device=x.device)[:, None]
        for model in self.models:
            model.train()
        for epoch in range(self.epoch, self.timeline.epochs):
            lr = self.lr_at(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            order = self.order(epoch)
            for start in range(0, self.cfg.data.n_train, self.batch):
                idx = order[:, start : start + self.batch]
                xb, yb = x[rows, idx], y[rows, idx]
                if recorder.wants_input_grad(self.step + 1):
                    xb.requires_grad_(True)  # a fresh leaf (advanced indexing copies): dL/dx comes free
                outs = [model(xb[m]) for m, model in enumerate(self.models)]
                losses = torch.stack([loss_fn(out, yb[m]).mean() for m, out in enumerate(outs)])
                self.optimizer.zero_grad(set_to_none=True)
                recorder.before_backward(self.step + 1, xb, outs)
                losses.sum().backward()
                recorder.after_backward(self.step + 1, xb, outs, yb)
                self.optimizer.step()
                self.step += 1
                with torch.no_grad():
                    errors = torch.stack([sample_error(out, yb[m], self.loss).mean() for m, out in enumerate(outs)])
                    summary = torch.stack([losses.detach(), errors]).cpu().numpy()
                if not np.isfinite(summary[0]).all():
                    bad = int(np.flatnonzero(~np.isfinite(summary[0]))[0])
                    raise TrainingDiverged(
                        f"the loss became {summary[0][bad]} at step {self.step} (replicate {bad}); "
                        f"lower train.lr (now {lr:g})"
                    )
                info = StepInfo(self.step, epoch, lr, summary[0], summary[1], idx.shape[1])
                recorder.after_step(info)
                for observer in observers:
                    observer.on_step(info)
                if start + self.batch < self.cfg.data.n_train:
                    recorder.at_step(self.step, epoch)
            self.epoch = epoch + 1
            recorder.at_step(self.step, self.epoch)
        recorder.flush()
