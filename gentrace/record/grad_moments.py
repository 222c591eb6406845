"""Probe `grad`: per-sample gradient moments of every trainable tensor of every replicate.

SPEC section 4; GSNR paper (Liu et al. 2020) section 2, eq. 2: the GSNR of parameter q is
k_q^2 / rho_q^2, the squared mean over the per-sample variance of its gradient, so a row stores
sum_i g_iq, sum_i g_iq^2 and the sign counts over a sample set, from which every analysis follows.

- `source = "probe"`: at each recorded step (parameters as they are before that step's update),
  one extra pass in eval mode over the replicate's training set, or its first `samples` samples
  (the training subsets are random draws from the pool, so these are a random subset too).
- `source = "train-batches"`: hooks accumulate the moments of the training mini-batches
  themselves (mean loss, rescaled to per-sample losses) between recorded steps, no extra pass;
  a row at step s covers the batches of steps (previous row, s], each at its own parameters.

Frozen tensors (model.freeze) have no moments.

Under torchrun each rank accumulates its own samples (its piece of the probe set, or its piece of
each training batch) and a row is the all-reduced sum (gentrace.training.distributed). For train-batches the
pieces are also summed into rank 0 at every parameter snapshot, so the partial accumulation a resume
checkpoint saves is the whole run's, not rank 0's share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from gentrace.core.schedules import every_epochs, every_steps
from gentrace.moments.accumulator import Moments, pos_neg
from gentrace.moments.engine import MomentsEngine, probe_moments
from gentrace.record.base import Batch, Probe, RunContext, StepInfo, to_host
from gentrace.store import schema
from gentrace.store.writer import RowBlock

# Samples per forward/backward of the probe pass (the moments do not depend on it, up to float rounding).
PROBE_BATCH = 256
# Float inputs of this few numbers a sample (tabular data, digits' 1 x 8 x 8 pixels) take 4x that: a small
# model's pass is mostly per-call overhead (hooks, kernel launches), and the quick start's 500 samples then
# take one pass, whose moments need no float64 accumulation at all (accumulator.TensorMoments.stored).
SMALL_INPUT = 256


def probe_batch(x: torch.Tensor) -> int:
    """Samples per probe pass over inputs x [n, ...]: PROBE_BATCH, or 4x for float samples of <= SMALL_INPUT numbers."""
    small = x.dim() >= 2 and x.is_floating_point() and math.prod(x.shape[1:]) <= SMALL_INPUT
    return 4 * PROBE_BATCH if small else PROBE_BATCH


class GradMomentsProbe(Probe):
    """Writes `grad/<tensor>/{sum,sumsq,pos,neg}` [G, M, *shape], `grad/step` [G], `grad/n`, `grad/loss_sum` [G, M]."""

    name = schema.GRAD.name

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        rec = ctx.record.grad_moments
        self.source = rec.source
        self.steps = self.schedule()
        self.samples = rec.samples or int(ctx.data.x_train.shape[1])
        self.engines = [MomentsEngine(model) for model in ctx.models]
        self.shapes = {n: tuple(p.shape) for n, p in ctx.models[0].named_parameters() if p.requires_grad}
        self._loss = ctx.per_sample_loss()
        self._seen = np.zeros(len(ctx.models), np.int64)
        self._loss_sum = torch.zeros(len(ctx.models), dtype=torch.float64, device=ctx.device)
        self._restored = False
        self.dist = ctx.dist

    def schedule(self) -> set[int]:
        """Every `every_steps` steps and every `every_epochs` epochs; train-batches skips step 0."""
        rec, tl = self.ctx.record.grad_moments, self.ctx.timeline
        steps = set(every_steps(rec.every_steps, tl)) | set(every_epochs(rec.every_epochs, tl))
        if self.source == "train-batches":
            steps.discard(0)  # no batch has been seen at initialization
        # train-batches under torchrun: steps where rank 0 may write a checkpoint holding our partial sums
        self.sync_steps = set(every_epochs(self.ctx.record.params.every_epochs, tl))
        return steps

    def streams(self) -> list[schema.StreamSpec]:
        """One `grad` stream with a row per recorded step."""
        return [schema.grad_stream(len(self.steps), len(self.ctx.models), self.shapes)]

    def install(self) -> list[RemovableHandle]:
        """Hooks on every parameterized module; train-batches starts accumulating at once."""
        handles = [h for engine in self.engines for h in engine.install()]
        if self.source == "train-batches":
            for engine in self.engines:
                engine.begin(mean_loss=True, reset=not self._restored)
        return handles

    def before_backward(self, batch: Batch) -> None:
        """train-batches under torchrun: each sample's loss carries weight world / B, not 1 / len(piece)."""
        if self.source == "train-batches":
            weight = batch.sample_weight
            for engine in self.engines:
                engine.delta_scale = None if weight is None else 1.0 / weight

    def after_step(self, info: StepInfo) -> Iterable[RowBlock]:
        """train-batches: count the batch's samples and summed loss."""
        if self.source == "train-batches":
            self._seen += info.batch_size
            # on the training device: summed here, read back only when a row is written
            self._loss_sum = self._loss_sum + info.batch_loss.detach().to(torch.float64) * info.batch_size
        return ()

    def at_step(self, step: int, epoch: int) -> Iterable[RowBlock]:
        """At a recorded step: a probe pass per replicate, or the moments accumulated since the last row."""
        if step not in self.steps:
            if self.source == "train-batches" and self.dist.world > 1 and step in self.sync_steps:
                self._sync_to_main()
            return
        if self.source == "probe":
            per_replicate = [self._probe_pass(m) for m in range(len(self.engines))]
            for moments in per_replicate:
                self.dist.all_reduce_moments(moments, self.shapes, self.ctx.device)
            row = self._row(step, per_replicate)
        else:
            per_replicate = [engine.end() for engine in self.engines]
            loss_sums = self._loss_sum.cpu().numpy()
            for m, moments in enumerate(per_replicate):
                # n and loss_sum come from the step summaries, which already cover every rank
                self.dist.all_reduce_moments(moments, self.shapes, self.ctx.device, counts=False)
                moments.n, moments.loss_sum = int(self._seen[m]), float(loss_sums[m])
            row = self._row(step, per_replicate)  # before begin(), which reuses the accumulators
            for engine in self.engines:
                engine.begin(mean_loss=True)
            self._seen[:] = 0
            self._loss_sum = torch.zeros_like(self._loss_sum)
        if self.dist.is_main:
            yield RowBlock(self.name, self.take_row(self.name), row)

    def _sync_to_main(self) -> None:
        """Sum every rank's partial train-batches moments into rank 0; the other ranks start again from zero."""
        for engine in self.engines:
            self.dist.all_reduce_moments(engine.moments, self.shapes, self.ctx.device, counts=False)
            if not self.dist.is_main:
                for acc in engine.moments.tensors.values():
                    acc.zero_()

    def state(self) -> dict[str, Any] | None:
        """train-batches: the moments accumulated since the last row (a resumed run continues them)."""
        if self.source != "train-batches":
            return None
        loss = self._loss_sum.cpu().numpy().copy()  # a checkpoint reads the device anyway
        return {"moments": [e.moments for e in self.engines], "seen": self._seen.copy(), "loss": loss}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue the accumulation saved by `state`."""
        for engine, moments in zip(self.engines, state["moments"], strict=True):
            if self.dist.is_main:  # the saved sums cover every rank: the others continue from zero
                engine.moments = moments
        self._seen = state["seen"]
        self._loss_sum = torch.as_tensor(np.asarray(state["loss"], np.float64), device=self.ctx.device)
        self._restored = True

    def _probe_pass(self, m: int) -> Moments:
        model = self.ctx.models[m]
        part = self.dist.shard(self.samples)  # under torchrun: this rank's piece of the probe set
        x = self.ctx.data.x_train[m][: self.samples][part]
        y = self.ctx.data.y_train[m][: self.samples][part]
        was_training = model.training
        model.eval()
        try:
            return probe_moments(self.engines[m], model, x, y, self._loss, probe_batch(x))
        finally:
            model.train(was_training)

    def _zeros(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`TensorMoments.stored()` of a tensor without moments."""
        f = torch.zeros(shape, dtype=torch.float32, device=self.ctx.device)
        i = torch.zeros(shape, dtype=torch.int32, device=self.ctx.device)
        return f, f, i, i

    def _row(self, step: int, per_replicate: list[Moments]) -> dict[str, np.ndarray]:
        grad = schema.GRAD
        row: dict[str, np.ndarray] = {
            grad.step: np.array([step], np.int64),
            grad.n: np.array([[m.n for m in per_replicate]], np.int64),
            grad.loss_sum: np.array([[m.loss_sum for m in per_replicate]], np.float64),
        }
        # Every tensor's moments go to the host in two copies, one float32 and one int32 buffer, whose slices are
        # the row's arrays: a row of a small model is otherwise mostly per-array casts, stacks and copies.
        sums: list[torch.Tensor] = []
        sumsqs: list[torch.Tensor] = []
        sign_sums: list[torch.Tensor] = []
        nonzeros: list[torch.Tensor] = []
        for name, shape in self.shapes.items():
            for m in per_replicate:
                stats = m.tensors.get(name)
                s, sq, sign_sum, nonzero = stats.stored() if stats is not None else self._zeros(shape)
                sums.append(s.reshape(-1))
                sumsqs.append(sq.reshape(-1))
                sign_sums.append(sign_sum.reshape(-1))
                nonzeros.append(nonzero.reshape(-1))
        if not sums:  # nothing trainable
            return row
        floats = to_host(torch.cat(sums + sumsqs), fresh=True)
        counts = to_host(torch.cat(sign_sums + nonzeros), fresh=True)
        half = len(floats) // 2
        pos, neg = pos_neg(counts[:half], counts[half:])
        by_moment = {"sum": floats[:half], "sumsq": floats[half:], "pos": pos, "neg": neg}
        offset, replicates = 0, len(per_replicate)
        for name, shape in self.shapes.items():
            size = replicates * math.prod(shape)
            for moment in grad.MOMENTS:
                values = by_moment[moment][offset : offset + size]
                row[grad.moment(name, moment)] = values.reshape(1, replicates, *shape)
            offset += size
        return row


def grad_moments_probe(ctx: RunContext) -> GradMomentsProbe | None:
    """`record.grad_moments`, or None when both cadences are 0."""
    rec = ctx.record.grad_moments
    if rec.every_steps == 0 and rec.every_epochs == 0:
        return None
    probe = GradMomentsProbe(ctx)
    return probe if probe.steps else None
