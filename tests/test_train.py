"""Training and recording in process: determinism, replicates, resume, schedules, stream values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAt

from gentrace.core import config
from gentrace.store.reader import StoreReader
from gentrace.task.losses import per_sample_loss, sample_error
from gentrace.task.models import build_model
from gentrace.training import run

TINY = [
    "data.n_train=120",
    "data.n_test=100",
    "model.hidden=[16]",
    "train.epochs=4",
    "train.batch_size=32",
    "train.replicates=2",
    "record.checkpoint_every_s=0",
]


def tiny(*overrides: str) -> config.RunConfig:
    return config.load(None, [*TINY, *overrides])


def arrays(path: Path) -> dict[str, np.ndarray]:
    reader = StoreReader(path)
    return {p: reader.array(p) for paths in reader.streams().values() for p in paths}


def assert_same_store(a: Path, b: Path) -> None:
    left, right = arrays(a), arrays(b)
    assert left.keys() == right.keys()
    for key in left:
        assert np.array_equal(left[key], right[key], equal_nan=True), key


def test_same_seed_same_store(tmp_path: Path) -> None:
    cfg = tiny()
    run.record(cfg, tmp_path / "a", device="cpu")
    run.record(cfg, tmp_path / "b", device="cpu")
    assert_same_store(tmp_path / "a", tmp_path / "b")


def test_replicates_trained_together_equal_one_trained_alone(tmp_path: Path) -> None:
    together = run.record(tiny(), tmp_path / "m2", device="cpu")
    alone = run.record(tiny("train.replicates=1"), tmp_path / "m1", device="cpu")
    two, one = StoreReader(together), StoreReader(alone)
    assert np.array_equal(two.array("data/train_index")[0], one.array("data/train_index")[0])
    for name in two.tensor_names("params"):
        assert np.array_equal(two.array(f"params/{name}")[:, 0], one.array(f"params/{name}")[:, 0]), name
    # replicates start from one initialization and then diverge on their own subsets
    w = two.array("params/0.weight")
    assert np.array_equal(w[0, 0], w[0, 1])
    assert not np.array_equal(w[-1, 0], w[-1, 1])


@pytest.mark.parametrize("stop", [1, 4, 9, 13])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path: Path, stop: int) -> None:
    cfg = tiny("model.dropout=0.2", "train.optimizer='adam'")
    run.record(cfg, tmp_path / "ref", device="cpu")
    with pytest.raises(run.Interrupted):
        run.record(cfg, tmp_path / "cut", device="cpu", observers=[StopAt(stop)])
    cut = StoreReader(tmp_path / "cut")
    assert cut.status == "interrupted"
    assert cut.committed("metrics_fine") == stop  # buffered rows were flushed
    run.record(None, tmp_path / "cut", device="cpu", resume=True)
    assert StoreReader(tmp_path / "cut").status == "complete"
    assert_same_store(tmp_path / "ref", tmp_path / "cut")


def test_resume_of_complete_store_changes_nothing(tmp_path: Path) -> None:
    path = run.record(tiny(), tmp_path / "a", device="cpu")
    before = arrays(path)
    run.record(None, path, device="cpu", resume=True)
    after = arrays(path)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_lr_decay_full_batch_and_frozen_prefix(tmp_path: Path) -> None:
    cfg = tiny("train.batch_size=0", "train.lr_decay={every_epochs=2, factor=0.5}", "model.freeze=['0.']")
    reader = StoreReader(run.record(cfg, tmp_path / "a", device="cpu"))
    assert reader.attrs["steps_per_epoch"] == 1
    lr = reader.array("metrics_fine/lr")
    assert np.allclose(lr, cfg.train.lr * np.array([1, 1, 0.5, 0.5]))
    first = reader.array("params/0.weight")
    assert (first == first[0]).all()  # frozen
    last = reader.array("params/2.weight")
    assert not (last == last[0]).all()
    assert np.array_equal(reader.array("metrics/lr"), cfg.train.lr * np.array([1, 1, 1, 0.5, 0.5]))


def test_step_one_metrics_fine_match_a_recomputation(tmp_path: Path) -> None:
    """batch_loss and batch_error of step 1 from the initial parameters and the first batch."""
    cfg = tiny()
    trainer, _, data = run.prepare(cfg, torch.device("cpu"))
    reader = StoreReader(run.record(cfg, tmp_path / "a", device="cpu"))
    order = trainer.order(0)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    loss_fn = per_sample_loss("cross_entropy")
    for m in range(cfg.train.replicates):
        state = {name: torch.from_numpy(reader.array(f"params/{name}")[0, m]) for name in reader.tensor_names("params")}
        model.load_state_dict(state)
        idx = order[m, : cfg.train.batch_size]
        out = model(data.x_train[m][idx]).double()
        y = data.y_train[m][idx]
        assert reader.array("metrics_fine/batch_loss")[0, m] == pytest.approx(loss_fn(out, y).mean().item(), rel=1e-5)
        error = sample_error(out, y, "cross_entropy").mean().item()
        assert reader.array("metrics_fine/batch_error")[0, m] == pytest.approx(error, rel=1e-5)


def test_metrics_at_initialization_match_a_recomputation(tmp_path: Path) -> None:
    cfg = tiny()
    _, _, data = run.prepare(cfg, torch.device("cpu"))
    reader = StoreReader(run.record(cfg, tmp_path / "a", device="cpu"))
    model = build_model(cfg.model, data.input_shape, data.num_classes).double()
    with torch.no_grad():
        out = model(data.x_test.double())
    loss = torch.nn.functional.cross_entropy(out, data.y_test).item()
    acc = (out.argmax(1) == data.y_test).double().mean().item()
    assert reader.array("metrics/test_loss")[0] == pytest.approx([loss, loss], rel=1e-5)
    assert reader.array("metrics/test_acc")[0] == pytest.approx([acc, acc], abs=1e-6)
    assert np.array_equal(reader.array("preds/test")[0, 0], out.argmax(1).numpy())


def test_regression_run_records_outputs_and_absolute_error(tmp_path: Path) -> None:
    cfg = config.load(
        None,
        [
            "data.name='cos2d'",
            "data.dim=10",
            "data.n_train=50",
            "data.n_test=40",
            "model.hidden=[16, 16]",
            "train.epochs=2",
            "train.batch_size=1",
            "train.replicates=1",
        ],
    )
    reader = StoreReader(run.record(cfg, tmp_path / "r", device="cpu"))
    assert reader.attrs["loss"] == "mse"
    assert reader.array("preds/test").dtype == np.float32
    assert np.isnan(reader.array("metrics/test_acc")).all()
    assert reader.committed("params_fine") == 101
    # batch size 1: the error of a step is |f(x) - y| and the mse loss its square
    err, loss = reader.array("metrics_fine/batch_error"), reader.array("metrics_fine/batch_loss")
    assert np.allclose(loss, err**2, rtol=1e-4)
    assert reader.tensor_names("params_fine") == ["0.bias"]


def test_eval_every_steps(tmp_path: Path) -> None:
    reader = StoreReader(run.record(tiny("record.eval_every_steps=1"), tmp_path / "a", device="cpu"))
    assert np.array_equal(reader.array("metrics/step"), np.arange(reader.attrs["total_steps"] + 1))
    assert np.array_equal(reader.array("metrics/epoch"), reader.array("metrics/step") // 4)
