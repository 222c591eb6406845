"""Replay (the model at a snapshot, the inputs of a split) and the training-state checkpoint layout."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from gentrace.analyses import replay
from gentrace.analyses.replay import Replay
from gentrace.core import config
from gentrace.core.config import ModelConfig
from gentrace.core.errors import AnalysisInputError, StoreError
from gentrace.store.reader import StoreReader
from gentrace.task import checkpoint
from gentrace.task.checkpoint import TrainingState
from gentrace.training import run
from gentrace.training.loop import Trainer

TINY = [
    "data.n_train=40",
    "data.n_test=30",
    "model.hidden=[8]",
    "train.epochs=2",
    "train.batch_size=16",
    "train.replicates=2",
    "record.checkpoint_every_s=0",
    "record.params_fine.every_steps=0",
    "record.grad_moments.every_epochs=0",
    "record.activations.every_epochs=0",
]


def _bn_mlp(cfg: ModelConfig, input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    """An MLP with BatchNorm (the running statistics are buffers, which parameter snapshots do not hold)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(np.prod(input_shape)), 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, out_dim),
        )


def _predicted(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).argmax(1).numpy()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run.record(config.load(None, TINY), tmp_path_factory.mktemp("replay") / "mlp.zarr", device="cpu")


@pytest.fixture(scope="module")
def bn_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "build_model", _bn_mlp)
        return run.record(config.load(None, TINY), tmp_path_factory.mktemp("replay") / "bn.zarr", device="cpu")


def test_replayed_snapshot_is_the_recorded_one(store: Path) -> None:
    reader = StoreReader(store)
    rp = Replay(reader)
    model = rp.model()
    pred_steps = list(reader.array("preds/step"))
    assert len(rp.steps) == 3
    for g, step in enumerate(rp.steps):
        q = pred_steps.index(step)
        for m in range(rp.replicates):
            rp.load(model, g, m)
            for name, p in model.named_parameters():
                np.testing.assert_array_equal(p.detach().numpy(), reader.array(f"params/{name}")[g, m])
            for split in ("train", "test"):
                got = _predicted(model, rp.inputs(split, m))
                np.testing.assert_array_equal(got, reader.array(f"preds/{split}")[q, m])


def test_inputs_are_the_stored_samples(store: Path) -> None:
    rp = Replay(StoreReader(store))
    assert rp.replicates == 2
    assert rp.inputs("train", 1).shape == (40, *StoreReader(store).attrs["input_shape"])
    assert rp.inputs("test", 0) is rp.inputs("test", 1)
    assert rp.data() is rp.data()  # built once
    with pytest.raises(ValueError, match="unknown split"):
        rp.inputs("val", 0)


def test_buffers_come_from_the_checkpoint(bn_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "build_model", _bn_mlp)
    reader = StoreReader(bn_store)
    rp = Replay(reader)
    model = rp.model()
    pred_steps = list(reader.array("preds/step"))
    kept = reader.checkpoint_steps()
    assert kept == [int(s) for s in rp.steps[1:]]  # two checkpoints are kept: step 0's was pruned
    for g in (1, 2):
        state = checkpoint.unpack(reader.checkpoint(int(rp.steps[g])))
        for m in range(2):
            rp.load(model, g, m)
            for name, b in model.named_buffers():
                torch.testing.assert_close(b, state.models[m][name], rtol=0, atol=0)
            assert model[2].running_mean.abs().sum() > 0  # trained statistics, not the fresh zeros
            got = _predicted(model, rp.inputs("test", m))
            np.testing.assert_array_equal(got, reader.array("preds/test")[pred_steps.index(rp.steps[g]), m])
    with pytest.raises(AnalysisInputError, match="has buffers .* no checkpoint for step 0"):
        rp.load(model, 0, 0)


def test_missing_parameter_snapshots_are_refused(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "build_model", _bn_mlp)  # names 1.weight ... that the mlp store lacks
    with pytest.raises(AnalysisInputError, match=r'snapshots lack 1\.weight.*record.params.names = "all"'):
        Replay(StoreReader(store)).model()


def test_indices_that_do_not_match_are_a_store_error(store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "moved.zarr"
    shutil.copytree(store, copy)
    index = zarr.open_array(str(copy / "data" / "test_index"), mode="r+", zarr_format=3)
    index[...] = np.asarray(index[...]) + 1
    with pytest.raises(StoreError, match="does not match the stored data/train_index and data/test_index"):
        Replay(StoreReader(copy)).data()


# -- the checkpoint layout --------------------------------------------------------------------------
def _trainer() -> Trainer:
    trainer, _, _ = run.prepare(config.load(None, TINY), torch.device("cpu"))
    for p in trainer.optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    trainer.optimizer.step()  # optimizer state that is not empty
    trainer.step, trainer.epoch = 7, 1
    return trainer


def test_pack_is_byte_for_byte_the_old_layout() -> None:
    trainer = _trainer()
    extra = {"probes": {"a": np.arange(3)}}
    new = trainer.checkpoint(extra)
    old: dict[str, object] = {  # Trainer.checkpoint before gentrace.task.checkpoint existed
        "extra": extra,
        "step": trainer.step,
        "epoch": trainer.epoch,
        "models": [model.state_dict() for model in trainer.models],
        "optimizer": trainer.optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buffer = io.BytesIO()
    torch.save(old, buffer)
    assert new == buffer.getvalue()


def test_unpack_round_trip_and_restore() -> None:
    trainer = _trainer()
    payload = trainer.checkpoint({"probes": {"x": 1}})
    state = checkpoint.unpack(payload)
    assert (state.step, state.epoch, state.extra) == (7, 1, {"probes": {"x": 1}})
    assert len(state.models) == 2
    for model, saved in zip(trainer.models, state.models, strict=True):
        for name, t in model.state_dict().items():
            torch.testing.assert_close(saved[name], t, rtol=0, atol=0)
    torch.testing.assert_close(state.rng_cpu, torch.get_rng_state(), rtol=0, atol=0)
    assert checkpoint.pack(state) == payload
    fresh, _, _ = run.prepare(config.load(None, TINY), torch.device("cpu"))
    assert fresh.restore(payload) == {"probes": {"x": 1}}
    assert (fresh.step, fresh.epoch) == (7, 1)
    assert fresh.checkpoint({"probes": {"x": 1}}) == payload


@pytest.mark.parametrize(
    "foreign", [[1, 2], {"models": []}, {"step": 0, "optimizer": {}}, "text"], ids=["list", "dict", "dict2", "str"]
)
def test_a_foreign_payload_is_refused(foreign: object) -> None:
    buffer = io.BytesIO()
    torch.save(foreign, buffer)
    with pytest.raises(ValueError, match="not a gentrace training checkpoint"):
        checkpoint.check(buffer.getvalue())
    with pytest.raises(ValueError, match="not a gentrace training checkpoint"):
        checkpoint.unpack(buffer.getvalue())


def test_bytes_that_are_no_torch_file_are_refused() -> None:
    with pytest.raises((RuntimeError, pickle.UnpicklingError, EOFError)):
        checkpoint.check(b"\x00not a zip file")


def test_training_state_defaults() -> None:
    state = TrainingState(step=0, epoch=0, models=[], optimizer={}, rng_cpu=torch.get_rng_state())
    assert checkpoint.unpack(checkpoint.pack(state)).rng_cuda == []
