"""The `acts` stream: packed ReLU bitmasks per call site, equal to a recomputation from stored parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gentrace.core import config
from gentrace.core.config import ModelConfig
from gentrace.core.errors import ConfigError
from gentrace.record.activations import pack_bits, relu_call_sites
from gentrace.store.reader import StoreReader
from gentrace.task.models import build_model
from gentrace.training import run

BASE = [
    "data.n_train=60",
    "data.n_test=30",
    "train.epochs=2",
    "train.batch_size=20",
    "record.grad_moments.every_epochs=0",
    "record.activations={every_epochs=1, probe=13, values=true}",
]


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 5), units=st.integers(1, 70), seed=st.integers(0, 1000))
def test_pack_bits_is_numpy_packbits_little(batch: int, units: int, seed: int) -> None:
    on = torch.from_numpy(np.random.default_rng(seed).random((batch, units)) > 0.5)
    packed = pack_bits(on).numpy()
    assert packed.shape == (batch, -(-units // 8))
    assert np.array_equal(packed, np.packbits(on.numpy(), axis=-1, bitorder="little"))
    assert np.array_equal(np.unpackbits(packed, axis=-1, count=units, bitorder="little").astype(bool), on.numpy())


def test_resnet_call_sites_get_one_layer_per_call() -> None:
    model = build_model(ModelConfig(arch="resnet18"), (1, 8, 8), 10).eval()
    sites = relu_call_sites(model, torch.randn(1, 1, 8, 8))
    assert "relu" in sites
    assert {"layer1.0.relu@0", "layer1.0.relu@1", "layer4.1.relu@1"} <= set(sites)
    assert sites["layer1.0.relu@0"]["module"] == "layer1.0.relu"
    assert sites["layer1.0.relu@0"]["units"] == 64 * 8 * 8
    assert not any(m._forward_hooks for m in model.modules())


def _recompute(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    outs: dict[str, list[np.ndarray]] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        return lambda m, i, o: outs.setdefault(name, []).append((o.detach().flatten(1) > 0).numpy())

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return {n: v[0] for n, v in outs.items()}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_stored_bits_equal_a_recomputation(tmp_path: Path, arch: str) -> None:
    cfg = config.load(None, [*BASE, f"model.arch='{arch}'", "model.hidden=[20, 11]", "model.channels=3"])
    _, _, data = run.prepare(cfg, torch.device("cpu"))
    reader = StoreReader(run.record(cfg, tmp_path / "s", device="cpu"))
    assert np.array_equal(reader.array("data/probe_index"), np.arange(13))
    assert np.array_equal(reader.array("acts/epoch"), [0, 1, 2])
    layers = reader.act_layers()
    assert layers
    for row in (0, 2):
        model = build_model(cfg.model, data.input_shape, 10)
        model.load_state_dict(
            {n: torch.from_numpy(reader.array(f"params/{n}")[row, 0]) for n in reader.tensor_names("params")}
        )
        expected = _recompute(model, data.x_train[0][:13])
        assert set(expected) == set(layers)
        for layer in layers:
            units = reader.lazy(f"acts/{layer}/bits").attrs["units"]
            bits = np.unpackbits(reader.array(f"acts/{layer}/bits")[row], axis=-1, count=units, bitorder="little")
            assert np.array_equal(bits.astype(bool), expected[layer]), layer
            values = reader.array(f"acts/{layer}/values")[row]
            assert np.array_equal(values > 0, expected[layer])


def test_hooks_are_removed_after_every_pass() -> None:
    cfg = config.load(None, [*BASE, "model.arch='cnn'", "model.channels=3"])
    trainer, recorder, _ = run.prepare(cfg, torch.device("cpu"))
    probe = next(p for p in recorder.probes if p.name == "acts")
    rows = list(probe.at_step(0, 0))
    assert len(rows) == 1
    assert not any(m._forward_hooks for model in trainer.models for m in model.modules())


def test_unknown_layer_is_refused() -> None:
    cfg = config.load(None, [*BASE, "record.activations={every_epochs=1, probe=4, layers=['7']}"])
    with pytest.raises(ConfigError, match="record.activations.layers"):
        run.prepare(cfg, torch.device("cpu"))


def test_probe_larger_than_the_training_set_takes_every_sample() -> None:
    cfg = config.load(None, [*BASE, "record.activations.probe=500"])
    _, recorder, _ = run.prepare(cfg, torch.device("cpu"))
    assert np.array_equal(recorder.static()["data/probe_index"], np.arange(60))
