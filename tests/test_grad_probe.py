"""The `grad` stream in a real recording equals one backward per sample on the stored parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import StopAt
from reference_moments import moments_of, per_sample_grads

from gentrace.core import config
from gentrace.store.reader import StoreReader
from gentrace.task.models import build_model
from gentrace.training import run

BASE = [
    "data.n_train=40",
    "data.n_test=30",
    "model.hidden=[12, 8]",
    "train.epochs=3",
    "train.batch_size=16",
    "train.replicates=2",
    "record.checkpoint_every_s=0",
]


def _model_at(reader: StoreReader, cfg: config.RunConfig, row: int, m: int, shape: tuple[int, ...]) -> torch.nn.Module:
    model = build_model(cfg.model, shape, 10)
    state = {n: torch.from_numpy(reader.array(f"params/{n}")[row, m]) for n in reader.tensor_names("params")}
    model.load_state_dict(state)
    return model.eval()


def _assert_row(reader: StoreReader, row: int, m: int, grads: dict[str, torch.Tensor]) -> None:
    for name, g in grads.items():
        s, sq, pos, neg = (t.numpy() for t in moments_of(g))
        np.testing.assert_allclose(reader.array(f"grad/{name}/sum")[row, m], s, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(reader.array(f"grad/{name}/sumsq")[row, m], sq, rtol=1e-4, atol=1e-8)
        assert np.array_equal(reader.array(f"grad/{name}/pos")[row, m], pos), name
        assert np.array_equal(reader.array(f"grad/{name}/neg")[row, m], neg), name


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def test_probe_source_on_a_subset(tmp_path: Path) -> None:
    cfg = config.load(None, [*BASE, "record.grad_moments={every_epochs=1, source='probe', samples=25}"])
    _, _, data = run.prepare(cfg, torch.device("cpu"))
    reader = StoreReader(run.record(cfg, tmp_path / "s", device="cpu"))
    assert np.array_equal(reader.array("grad/step"), reader.array("params/step"))
    assert (reader.array("grad/n") == 25).all()
    for row in (0, 2):
        for m in range(2):
            model = _model_at(reader, cfg, row, m, data.input_shape)
            x, y = data.x_train[m][:25], data.y_train[m][:25]
            _assert_row(reader, row, m, per_sample_grads(model, x, y, _loss))
            with torch.no_grad():
                loss_sum = _loss(model(x), y).sum().item()
            assert reader.array("grad/loss_sum")[row, m] == pytest.approx(loss_sum, rel=1e-5)


def test_train_batches_source_covers_each_step_batch(tmp_path: Path) -> None:
    cfg = config.load(None, [*BASE, "record.grad_moments={every_steps=1, every_epochs=0, source='train-batches'}"])
    trainer, _, data = run.prepare(cfg, torch.device("cpu"))
    reader = StoreReader(run.record(cfg, tmp_path / "s", device="cpu"))
    steps = reader.array("grad/step")
    assert steps[0] == 1  # no row at initialization: no batch seen yet
    assert np.array_equal(reader.array("grad/n")[:3, 0], [16, 16, 8])  # the last batch of an epoch is short
    # the row at step 1 holds the first batch's per-sample gradients at the initial parameters
    order = trainer.order(0)
    for m in range(2):
        model = _model_at(reader, cfg, 0, m, data.input_shape)
        idx = order[m, :16]
        _assert_row(reader, 0, m, per_sample_grads(model, data.x_train[m][idx], data.y_train[m][idx], _loss))


def test_train_batches_accumulation_survives_resume(tmp_path: Path) -> None:
    """A checkpoint between two grad rows carries the partial accumulation (probe state)."""
    cfg = config.load(None, [*BASE, "train.epochs=4", "record.grad_moments={every_epochs=2, source='train-batches'}"])
    run.record(cfg, tmp_path / "ref", device="cpu")
    with pytest.raises(run.Interrupted):
        run.record(cfg, tmp_path / "cut", device="cpu", observers=[StopAt(5)])  # epoch 2 of 4, after checkpoint 1
    run.record(None, tmp_path / "cut", device="cpu", resume=True)
    ref, cut = StoreReader(tmp_path / "ref"), StoreReader(tmp_path / "cut")
    for path in ref.streams()["grad"]:
        assert np.array_equal(ref.array(path), cut.array(path)), path


def test_train_batches_beside_lipschitz_fine_extra_backward(tmp_path: Path) -> None:
    """Classification + lipschitz_fine: its extra backward of the predicted-class logits runs through the
    hooked forward pass before the loss backward; the train-batches moments must see the loss backward only."""
    grad = "record.grad_moments={every_steps=1, every_epochs=0, source='train-batches'}"
    both = config.load(None, [*BASE, grad, "record.lipschitz_fine.every_steps=1"])
    trainer, _, data = run.prepare(both, torch.device("cpu"))
    reader = StoreReader(run.record(both, tmp_path / "both", device="cpu"))
    spe = reader.attrs["steps_per_epoch"]
    assert np.array_equal(reader.array("grad/step"), np.arange(1, 3 * spe + 1))
    assert np.array_equal(reader.array("lipschitz_fine/step"), np.arange(1, 3 * spe + 1))
    # the first step of each epoch runs at the parameters of snapshot `epoch`: its row is that batch's moments
    for epoch in (0, 1):
        idx = trainer.order(epoch)[:, :16]
        for m in range(2):
            model = _model_at(reader, both, epoch, m, data.input_shape)
            x, y = data.x_train[m][idx[m]], data.y_train[m][idx[m]]
            _assert_row(reader, epoch * spe, m, per_sample_grads(model, x, y, _loss))
    # each stream as recorded alone, every row
    alone = {
        "grad": config.load(None, [*BASE, grad]),
        "lipschitz_fine": config.load(
            None, [*BASE, "record.grad_moments.every_epochs=0", "record.lipschitz_fine.every_steps=1"]
        ),
    }
    for stream, cfg in alone.items():
        ref = StoreReader(run.record(cfg, tmp_path / stream, device="cpu"))
        for path in ref.streams()[stream]:
            np.testing.assert_allclose(reader.array(path), ref.array(path), rtol=1e-6, atol=1e-9, err_msg=path)
