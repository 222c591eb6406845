"""Probe `lipschitz_fine`: the local Lipschitz constant at the sampled training points, inside the step.

BTH paper (Loukas et al. 2021), section 3: for a ReLU network the local Lipschitz constant at x is
the norm of the input gradient of the output, ||df/dx||. The BTH code logs it at the sampled point
of every batch-size-1 iteration; here, at steps N, 2N, ... (`record.lipschitz_fine.every_steps`),
the training step itself provides it, with the parameters before that step's update:

- one output (mse, bce): the training backward already yields dL/dx when the input is a leaf that
  requires grad, and for sample i of a batch of B, dL/dx_i = (1/B) l'(f_i) df/dx_i with
  l'(f) = 2 (f - y) (mse) or sigmoid(f) - y (bce); so ||df/dx_i|| = B ||dL/dx_i|| / |l'(f_i)|, at the
  cost of the first layer's input gradient only. A point with l'(f_i) = 0 (a perfect fit) gives no
  value and is left out.
- several outputs (cross-entropy): dL/dx mixes every logit, so one extra backward of the
  predicted-class logits to the input (no weight gradients) gives ||df_c/dx_i|| per point. It runs
  under `moments.engine.not_the_loss()`, so train-batches gradient moments see the loss backward only.

A row holds the mean and the max over the step's batch, per replicate ([L, M]). Under torchrun each
rank measures its piece of the batch and the sums, counts and maxima are all-reduced.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from gentrace.core.schedules import every_steps
from gentrace.moments.engine import not_the_loss
from gentrace.record.base import Batch, Probe, RunContext
from gentrace.store import schema
from gentrace.store.writer import RowBlock


class LipschitzFineProbe(Probe):
    """Writes `lipschitz_fine/step` [L] and `lipschitz_fine/mean`, `lipschitz_fine/max` [L, M]."""

    name = schema.LIPSCHITZ_FINE.name
    buffer_limit = 512
    rows_on_device = True  # single process; under torchrun each measured step is all-reduced anyway

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.steps = self.schedule()
        self._norms: torch.Tensor | None = None  # [M, B] of the current step

    def schedule(self) -> set[int]:
        """Every `every_steps` optimizer steps (not step 0: no batch has been seen)."""
        return set(every_steps(self.ctx.record.lipschitz_fine.every_steps, self.ctx.timeline)) - {0}

    def streams(self) -> list[schema.StreamSpec]:
        """One row per measured step."""
        return [schema.lipschitz_fine_stream(len(self.steps), len(self.ctx.models))]

    def wants_input_grad(self, step: int) -> bool:
        """Only at the measured steps does the training input become a leaf that requires grad."""
        return step in self.steps

    def before_backward(self, batch: Batch) -> None:
        """Several outputs: one backward of the predicted-class logits to the input."""
        if batch.step not in self.steps or self.ctx.loss != "cross_entropy":
            return
        outputs = batch.outputs
        picked = torch.stack([out.gather(1, out.argmax(1, keepdim=True)).sum() for out in outputs]).sum()
        # not the loss: `record.grad_moments.source = 'train-batches'` hooks must wait for the loss backward
        with not_the_loss():
            grads = torch.autograd.grad(picked, batch.leaves, retain_graph=True)
        self._norms = batch.input_norms(list(grads))

    def after_backward(self, batch: Batch) -> None:
        """One output: divide the loss's input gradient by the loss's output derivative."""
        if batch.step not in self.steps or self.ctx.loss == "cross_entropy":
            return
        outputs, y = batch.outputs, batch.y
        if y is None:
            return  # a user's loop that did not hand over its targets: no value at this step
        with torch.no_grad():
            f = torch.stack([out.detach().float().squeeze(-1) for out in outputs])  # [M, B]
            target = y.to(f.dtype)
            dloss = 2 * (f - target) if self.ctx.loss == "mse" else torch.sigmoid(f) - target
            # the loss's per-sample weight is 1 / B alone, world / B under torchrun: undo it
            grads = batch.input_norms([leaf.grad for leaf in batch.leaves])
            norms = batch.per_sample_scale * grads / dloss.abs()
            self._norms = torch.where(dloss != 0, norms, torch.full_like(norms, float("nan")))

    def at_step(self, step: int, epoch: int) -> Iterable[RowBlock]:
        """Hand over the measured step's mean and max."""
        if step not in self.steps or self._norms is None:
            return
        norms, self._norms = self._norms.detach().to(torch.float64), None
        mean, top = self._mean_and_max(norms)
        yield from self.emit(  # on the training device: the rows reach the host a block at a time
            self.name,
            {
                schema.LIPSCHITZ_FINE.step: np.array([step], np.int64),
                schema.LIPSCHITZ_FINE.mean: mean.to(torch.float32)[None],
                schema.LIPSCHITZ_FINE.max: top.to(torch.float32)[None],
            },
        )

    def _mean_and_max(self, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NaN-skipping mean and max [M] over the batch (every rank's piece under torchrun; norms [M, b] here)."""
        dist, valid = self.ctx.dist, ~norms.isnan()
        stats = torch.stack([torch.where(valid, norms, 0.0).sum(1), valid.sum(1).to(norms.dtype)])
        # amax of an empty piece (a rank without samples) is an error, not -inf
        top = (
            torch.where(valid, norms, -torch.inf).amax(1)
            if norms.shape[1]
            else norms.new_full(stats[0].shape, -torch.inf)
        )
        sums, tops = dist.all_reduce(stats), dist.all_reduce(top, "max")  # one process: as they are
        mean = sums[0] / sums[1]  # 0 / 0 = NaN: a batch of perfect fits has no value
        return mean, torch.where(tops == -torch.inf, torch.nan, tops)


def lipschitz_fine_probe(ctx: RunContext) -> LipschitzFineProbe | None:
    """`record.lipschitz_fine`, or None when every_steps is 0."""
    return LipschitzFineProbe(ctx) if ctx.record.lipschitz_fine.every_steps else None
