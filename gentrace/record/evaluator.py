"""Model outputs on whole splits at a step, computed once and shared by the metrics and preds probes.

Under torchrun each rank computes the outputs of its contiguous piece of the split and every rank
receives the whole [M, n_split, out] in sample order (gentrace.training.distributed).
"""

from __future__ import annotations

import torch

from gentrace.record.base import RunContext
from gentrace.task.batching import auto_chunk, layout


class Evaluator:
    """Caches, for the current step, each replicate's outputs on its training set and on the test set."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._step = -1
        self._cache: dict[str, torch.Tensor] = {}

    def outputs(self, step: int, split: str) -> torch.Tensor:
        """Outputs [M, n_split, out] of every replicate (eval mode, no grad) on `split` at `step`."""
        if step != self._step:
            self._step, self._cache = step, {}
        if split not in self._cache:
            self._cache[split] = self._compute(split)
        return self._cache[split]

    def targets(self, split: str) -> torch.Tensor:
        """Labels [M, n_split] of `split` (the test set is shared by every replicate)."""
        data = self.ctx.data
        if split == "train":
            return data.y_train
        return data.y_test.expand(len(self.ctx.models), *data.y_test.shape)

    def losses(self, step: int, split: str) -> torch.Tensor:
        """Per-sample losses [M, n_split]."""
        out, y = self.outputs(step, split), self.targets(split)
        fn = self.ctx.per_sample_loss()
        return torch.stack([fn(out[m], y[m]) for m in range(len(out))])

    @torch.no_grad()
    def _compute(self, split: str) -> torch.Tensor:
        data, dist = self.ctx.data, self.ctx.dist
        n = data.x_train.shape[1] if split == "train" else len(data.x_test)
        results = []
        for m, model in enumerate(self.ctx.models):
            x = (data.x_train[m] if split == "train" else data.x_test)[dist.shard(n)]
            # batches sized by input volume, images channels_last on the CPU (gentrace.task.batching): a
            # fixed 1024-sample batch made a CNN's evaluation memory-bound, 2.7x the training forward per sample
            chunk, memory_format = auto_chunk(x), layout(x)
            was_training = model.training
            model.eval()
            # range(0, max(len(x), 1)): a rank without samples still learns the output width from an empty batch
            parts = [
                model(x[i : i + chunk].contiguous(memory_format=memory_format)) for i in range(0, max(len(x), 1), chunk)
            ]
            results.append(torch.cat(parts))
            model.train(was_training)
        return dist.gather(torch.stack(results), n, dim=1)
