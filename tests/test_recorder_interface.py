"""The probes driven by a loop that is not gentrace's Trainer, through the interface of gentrace.record.base.

A plain loop (its own batches, its own optimizer call) builds a RunContext and a Checkpointer, calls
the Recorder at the documented points, and gets a store that the reader and the analyses take: rows
equal to what the loop computed, checkpoints that carry the probes' state, moments over the samples.
"""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gentrace.analyses import gsnr
from gentrace.core import config
from gentrace.core.config import to_dict
from gentrace.core.schedules import timeline
from gentrace.record.base import Batch, RunContext, StepInfo
from gentrace.record.ranks import Dist
from gentrace.record.recorder import Recorder
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.store.writer import create_store
from gentrace.task.data import build_data
from gentrace.task.losses import per_sample_loss, sample_error
from gentrace.task.models import build_model

CFG = [
    "data.n_train=96",
    "data.n_test=64",
    "model.hidden=[8]",
    "train.epochs=2",
    "train.batch_size=32",
    "train.replicates=2",
    "record.checkpoint_every_s=0",
    "record.params.every_epochs=1",
]


class PickleCheckpointer:
    """The smallest Checkpointer: the models' state dicts and `extra`, pickled; counts its calls."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.models = models
        self.calls = 0

    def checkpoint(self, extra: dict[str, Any]) -> bytes:
        self.calls += 1
        return pickle.dumps({"models": [m.state_dict() for m in self.models], "extra": extra})


def own_loop(path: Path, checkpointer: bool) -> tuple[list[np.ndarray], list[torch.nn.Module], PickleCheckpointer]:
    """Train with plain SGD on batches in sample order, recording through the Recorder; returns the step losses."""
    cfg = config.load(None, CFG)
    data = build_data(cfg.data, cfg.train.replicates)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    models = [copy.deepcopy(model) for _ in range(cfg.train.replicates)]  # one initialization
    tl = timeline(cfg.data.n_train, cfg.train.batch_size, cfg.train.epochs)
    ctx = RunContext(cfg.record, data, models, "cross_entropy", tl, torch.device("cpu"), 0.1, Dist())
    saver = PickleCheckpointer(models)
    recorder = Recorder(ctx, checkpointer=saver if checkpointer else None)
    attrs = {"config": to_dict(cfg), "steps_per_epoch": tl.steps_per_epoch, "total_steps": tl.total_steps}
    attrs |= {"loss": "cross_entropy", "num_classes": data.num_classes, "replicates": len(models)}
    writer = create_store(path, attrs, recorder.streams(), recorder.static())
    optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.1)
    loss_fn = per_sample_loss("cross_entropy")
    losses = []
    recorder.attach(writer)
    with recorder:
        recorder.at_step(0, 0)
        step = 0
        for epoch in range(tl.epochs):
            for start in range(0, cfg.data.n_train, cfg.train.batch_size):
                xb = data.x_train[:, start : start + cfg.train.batch_size]
                yb = data.y_train[:, start : start + cfg.train.batch_size]
                optimizer.zero_grad()
                outs = [m(xb[i]) for i, m in enumerate(models)]
                batch = Batch(step + 1, xb, outs, yb)
                recorder.before_backward(batch)
                per_model = torch.stack([loss_fn(out, yb[i]).mean() for i, out in enumerate(outs)])
                per_model.sum().backward()
                recorder.after_backward(batch)
                optimizer.step()
                step += 1
                with torch.no_grad():
                    errors = torch.stack(
                        [sample_error(out, yb[i], "cross_entropy").mean() for i, out in enumerate(outs)]
                    )
                losses.append(per_model.detach().numpy())
                info = StepInfo(step, epoch, 0.1, per_model.detach().numpy(), errors.numpy(), xb.shape[1])
                recorder.after_step(info)
                last_of_epoch = start + cfg.train.batch_size >= cfg.data.n_train
                recorder.at_step(step, epoch + 1 if last_of_epoch else epoch)
        recorder.flush()
    writer.close("complete")
    return losses, models, saver


def test_a_plain_loop_records_a_store_the_analyses_read(tmp_path: Path) -> None:
    losses, models, saver = own_loop(tmp_path / "own.zarr", checkpointer=True)
    reader = StoreReader(tmp_path / "own.zarr")
    assert reader.status == "complete"
    np.testing.assert_array_equal(reader.array(schema.METRICS_FINE.batch_loss), np.stack(losses).astype(np.float32))
    final = reader.array(schema.PARAMS.tensor("0.weight"))[-1]  # [M, *shape] after the last step
    for m, model in enumerate(models):
        np.testing.assert_array_equal(final[m], model.state_dict()["0.weight"].numpy())
    assert reader.array(schema.GRAD.n)[:, 0].tolist() == [96, 96, 96]  # steps 0, 3 and 6: every training sample
    table = gsnr.run(reader)
    assert sorted(set(table["step"])) == [0, 3, 6]
    # every parameter snapshot carries a checkpoint from the loop's Checkpointer, with the probes' state inside
    assert reader.checkpoint_steps() == [3, 6]  # two kept (CHECKPOINTS_KEPT); step 0's was pruned
    assert saver.calls == 3
    state = pickle.load(io.BytesIO(reader.checkpoint(6)))
    assert "probes" in state["extra"]
    np.testing.assert_array_equal(state["models"][1]["0.bias"].numpy(), models[1].state_dict()["0.bias"].numpy())


def test_a_loop_without_checkpointer_writes_snapshots_without_checkpoints(tmp_path: Path) -> None:
    own_loop(tmp_path / "plain.zarr", checkpointer=False)
    reader = StoreReader(tmp_path / "plain.zarr")
    assert reader.committed(schema.PARAMS.name) == 3
    assert reader.checkpoint_steps() == []


@pytest.mark.parametrize("weight", [None, 0.25])
def test_batch_per_sample_scale_undoes_the_loss_weight(weight: float | None) -> None:
    batch = Batch(1, torch.zeros(2, 8, 3), [], torch.zeros(2, 8), sample_weight=weight)
    assert batch.per_sample_scale == (8.0 if weight is None else 4.0)
