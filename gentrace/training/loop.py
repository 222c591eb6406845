"""The training loop: M replicates from one initialization, each on its own training subset.

The replicates are trained together: one optimizer over all of their parameters and one
backward pass of the summed batch losses (the gradient of sum_m L_m with respect to model m's
parameters is the gradient of L_m alone, so each replicate trains exactly as it would alone),
which saves M-1 backward launches and optimizer calls per step. Data order comes from a seed
per (model.seed, replicate, epoch), and the torch RNG (dropout) is saved in every checkpoint,
so a run resumed from a checkpoint reaches the same parameters as one never interrupted.

Under torchrun (`dist.world` > 1) the replicates are wrapped in one DistributedDataParallel
module and each step's batch is the single-process batch cut into contiguous pieces, one per rank
(gentrace.training.distributed); each rank backpropagates its piece's summed loss times world / B, so the
averaged gradient is the whole batch's mean gradient, and the step's loss and error are summed over
the ranks, so every rank sees the same numbers (and stops together on a NaN).

The loop calls the recorder at defined points and contains no storage code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from gentrace.core.config import RunConfig
from gentrace.core.errors import ConfigError
from gentrace.core.schedules import Timeline, timeline
from gentrace.record.base import Batch, DivergenceWatch, StepInfo
from gentrace.record.ranks import Dist
from gentrace.record.recorder import Recorder
from gentrace.task.checkpoint import TrainingState, pack, unpack
from gentrace.task.data import Dataset
from gentrace.task.losses import LossName, per_sample_loss, resolve_loss, sample_error


class StepObserver(Protocol):
    """Anything that wants to see each step (progress bars)."""

    def on_step(self, info: StepInfo) -> None:
        """Called after every optimizer step."""


class Replicas(nn.Module):
    """The M replicate models as one module (what DDP wraps): x [M, B, ...] -> M outputs [B, out]."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Replicate m sees x[m]."""
        return [model(x[m]) for m, model in enumerate(self.models)]


class Trainer:
    """Owns the replicate models, their optimizer and the step counter."""

    def __init__(self, cfg: RunConfig, data: Dataset, models: Sequence[nn.Module], dist: Dist | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.models = list(models)
        self.dist = dist or Dist()
        self.loss: LossName = resolve_loss(cfg.train.loss, data.num_classes)
        self.timeline: Timeline = timeline(cfg.data.n_train, cfg.train.batch_size, cfg.train.epochs)
        n = cfg.data.n_train
        self.batch = n if cfg.train.batch_size == 0 else min(cfg.train.batch_size, n)
        trainable = [p for model in self.models for p in model.parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer: torch.optim.Optimizer
        if t.optimizer == "own":
            raise ConfigError("train.optimizer = 'own' marks a store recorded by gentrace.Run; use sgd or adam")
        if t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(trainable, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(trainable, lr=t.lr, weight_decay=t.weight_decay)
        self.step = 0
        self.epoch = 0
        self.restored = False
        if self.dist.world == 1:
            torch.manual_seed(cfg.model.seed)
        else:  # dropout masks: each rank draws its own, as one process would for its piece of the batch
            torch.manual_seed(int(np.random.SeedSequence([cfg.model.seed, self.dist.rank]).generate_state(1)[0]))

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
        return pack(
            TrainingState(
                step=self.step,
                epoch=self.epoch,
                models=[model.state_dict() for model in self.models],
                optimizer=self.optimizer.state_dict(),
                rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                extra=extra or {},
            )
        )

    def restore(self, payload: bytes) -> dict[str, Any]:
        """Continue from a checkpoint written by `checkpoint`; returns its `extra`."""
        state = unpack(payload, map_location=self.data.x_train.device)
        for model, model_state in zip(self.models, state.models, strict=True):
            model.load_state_dict(model_state)
        self.optimizer.load_state_dict(state.optimizer)
        torch.set_rng_state(state.rng_cpu)
        if state.rng_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.rng_cuda)
        self.step, self.epoch = state.step, state.epoch
        if self.dist.world > 1:  # the checkpoint holds rank 0's RNG; every rank draws its own dropout masks
            seed = np.random.SeedSequence([self.cfg.model.seed, self.dist.rank, self.step]).generate_state(1)[0]
            torch.manual_seed(int(seed))
        self.restored = True
        return dict(state.extra)

    def _raise_if_diverged(self, watch: DivergenceWatch, recorder: Recorder, lr: float) -> None:
        """TrainingDiverged at the first step whose loss was not finite; rows buffered from it on are dropped."""
        found = watch.first()
        if found is not None:
            recorder.drop_from(found[0])
            raise watch.error(found, "replicate", f"lower train.lr (now {lr:g})")

    # -- the loop -------------------------------------------------------------------------------
    def _ddp(self) -> nn.Module:
        """The replicates wrapped in DistributedDataParallel (every rank holds the same parameters already)."""
        device = self.data.x_train.device
        return nn.parallel.DistributedDataParallel(
            Replicas(self.models), device_ids=[device] if device.type == "cuda" else None
        )

    def run(self, recorder: Recorder, observers: Sequence[StepObserver] = ()) -> None:
        """Train from the current step to the end, recording as configured."""
        if not self.restored:
            recorder.at_step(0, 0)
        self.train_steps(recorder, observers)

    def train_steps(self, recorder: Recorder, observers: Sequence[StepObserver] = (), count: int | None = None) -> None:
        """The optimizer steps from the current one, each followed by the recorder's `at_step` (`run` adds step 0's).

        With `count`, only that many steps, and no `at_step` after them: `gentrace check` times the
        training step (with the probes' in-step hooks) apart from the probes' scheduled passes.
        """
        first = self.step
        loss_fn = per_sample_loss(self.loss)
        x, y = self.data.x_train, self.data.y_train
        rows = torch.arange(len(self.models), device=x.device)[:, None]
        for model in self.models:
            model.train()
        world = self.dist.world
        forward = self._ddp() if world > 1 else None
        watch = DivergenceWatch(len(self.models), x.device)
        n = self.cfg.data.n_train
        for epoch in range(self.epoch, self.timeline.epochs):
            lr = self.lr_at(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            order = self.order(epoch)
            for start in range(0, self.cfg.data.n_train, self.batch):
                idx = order[:, start : start + self.batch]
                size = idx.shape[1]  # the whole batch, over every rank
                if world > 1:
                    idx = idx[:, self.dist.shard(size)]
                xb, yb = x[rows, idx], y[rows, idx]
                if recorder.wants_input_grad(self.step + 1):
                    xb.requires_grad_(True)  # a fresh leaf (advanced indexing copies): dL/dx comes free
                self.optimizer.zero_grad(set_to_none=True)
                if forward is None:
                    outs = [model(xb[m]) for m, model in enumerate(self.models)]
                    losses = torch.stack([loss_fn(out, yb[m]).mean() for m, out in enumerate(outs)])
                    batch = Batch(self.step + 1, xb, outs, yb)
                    recorder.before_backward(batch)
                    losses.sum().backward()
                else:
                    outs = forward(xb)
                    per_sample = torch.stack([loss_fn(out, yb[m]) for m, out in enumerate(outs)])  # [M, b]
                    batch = Batch(self.step + 1, xb, outs, yb, sample_weight=world / size)
                    recorder.before_backward(batch)
                    (per_sample.sum() * (world / size)).backward()  # DDP averages: the mean over the batch
                recorder.after_backward(batch)
                self.optimizer.step()
                self.step += 1
                with torch.no_grad():  # on the device: nothing is read back per step (gentrace.record.base)
                    if forward is None:
                        errors = torch.stack([sample_error(out, yb[m], self.loss).mean() for m, out in enumerate(outs)])
                        summary = torch.stack([losses.detach(), errors])
                    else:
                        errors = torch.stack([sample_error(out, yb[m], self.loss) for m, out in enumerate(outs)])
                        sums = self.dist.all_reduce(torch.stack([per_sample.detach().sum(1), errors.sum(1)]))
                        summary = sums / size
                watch.note(self.step, summary[0])
                last = count is None and epoch + 1 == self.timeline.epochs and start + self.batch >= n
                # before anything of this step is recorded; under torchrun every step, so that every rank
                # stops at the same step (the step's all-reduce has synchronized them already)
                if last or world > 1 or recorder.syncs_at(self.step):
                    self._raise_if_diverged(watch, recorder, lr)
                info = StepInfo(self.step, epoch, lr, summary[0], summary[1], size)
                recorder.after_step(info)
                for observer in observers:
                    observer.on_step(info)
                if count is not None:
                    if self.step - first == count:
                        return
                elif start + self.batch < self.cfg.data.n_train:
                    recorder.at_step(self.step, epoch)
            self.epoch = epoch + 1
            if count is None:
                recorder.at_step(self.step, self.epoch)
        if count is None:
            recorder.flush()
