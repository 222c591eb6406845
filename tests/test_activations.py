"""The `acts` stream: packed gate bitmasks per call site, equal to a recomputation from stored parameters."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gentrace.analyses import paths
from gentrace.core import config
from gentrace.core.config import ModelConfig
from gentrace.core.errors import ConfigError
from gentrace.record.activations import ActivationsProbe, call_sites, pack_bits, relu_call_sites
from gentrace.store.reader import StoreReader
from gentrace.task import budget
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


# layers = "relu" (the default) on gentrace's own architectures: (id, --set items on the quick start)
RELU_RUNS = [
    ("mlp", [*BASE, "model.arch='mlp'", "model.hidden=[20, 11]"]),
    ("cnn", [*BASE, "model.arch='cnn'", "model.hidden=[20, 11]", "model.channels=3"]),
    ("quickstart-1-epoch", ["train.epochs=1", "record.grad_moments.every_epochs=0"]),
]


@pytest.mark.parametrize("overrides", [pytest.param(c[1], id=c[0]) for c in RELU_RUNS])
def test_stored_bits_equal_a_recomputation(tmp_path: Path, overrides: list[str]) -> None:
    cfg = config.load(None, overrides)
    _, _, data = run.prepare(cfg, torch.device("cpu"))
    reader = StoreReader(run.record(cfg, tmp_path / "s", device="cpu"))
    probe, epochs = min(cfg.record.activations.probe, cfg.data.n_train), cfg.train.epochs
    assert np.array_equal(reader.array("data/probe_index"), np.arange(probe))
    assert np.array_equal(reader.array("acts/epoch"), np.arange(epochs + 1))
    layers = reader.act_layers()
    assert layers
    for row in (0, epochs):
        model = build_model(cfg.model, data.input_shape, 10)
        model.load_state_dict(
            {n: torch.from_numpy(reader.array(f"params/{n}")[row, 0]) for n in reader.tensor_names("params")}
        )
        expected = _recompute(model, data.x_train[0][:probe])
        assert set(expected) == set(layers)
        for layer in layers:
            attrs = reader.lazy(f"acts/{layer}/bits").attrs
            assert (attrs["module_type"], attrs["bit"]) == ("ReLU", "output > 0")
            bits = np.unpackbits(
                reader.array(f"acts/{layer}/bits")[row], axis=-1, count=attrs["units"], bitorder="little"
            )
            assert np.array_equal(bits.astype(bool), expected[layer]), layer
            if cfg.record.activations.values:
                values = reader.array(f"acts/{layer}/values")[row]
                assert np.array_equal(values > 0, expected[layer])


# -- layers = "gates" and lists: every gate module type ----------------------------------------------


class Gated(nn.Module):
    """Not a Sequential: one module of each gate type, a ReLU called twice, and a functional relu (no site)."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__()
        self.inp, self.gelu = nn.Linear(features, 9), nn.GELU()
        self.mid, self.silu = nn.Linear(9, 7), nn.SiLU()
        self.block = nn.Sequential(nn.Linear(7, 6), nn.LeakyReLU(0.1))
        self.elu, self.relu = nn.ELU(), nn.ReLU()
        self.a, self.b, self.head = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, *input_shape] -> [B, outputs]."""
        h = self.elu(self.block(self.silu(self.mid(self.gelu(self.inp(x.flatten(1)))))))
        h = self.relu(self.b(self.relu(self.a(h))))  # one module, two call sites: relu@0, relu@1
        return self.head(F.relu(h) + torch.relu(h))  # functional: no module, nothing recorded


class InPlace(nn.Sequential):
    """An in-place gate whose output has the other sign than its input (ELU with alpha < 0)."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__(
            nn.Flatten(), nn.Linear(features, 10), nn.ELU(alpha=-1.0, inplace=True), nn.Linear(10, outputs)
        )


class Gateless(nn.Module):
    """Tanh and functional gates only: nothing a module hook can see."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(features, 6), nn.Tanh(), nn.Linear(6, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, *input_shape] -> [B, outputs]."""
        return self.b(F.gelu(F.relu(self.act(self.a(x.flatten(1))))))


class GeluOnly(nn.Sequential):
    """A GELU MLP: no nn.ReLU, but a gate of "gates"."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(features, 8), nn.GELU(), nn.Linear(8, outputs))


Factory = Callable[[int, int], nn.Module]
GATED_SITES = ["gelu", "silu", "block.1", "elu", "relu@0", "relu@1"]
GATED_TYPES = ["GELU", "SiLU", "LeakyReLU", "ELU", "ReLU", "ReLU"]

# (id, model, record.activations.layers, the sites recorded in order, their module types, the bit)
SITE_CASES: list[tuple[str, Factory, Any, list[str], list[str], str]] = [
    ("gates", Gated, "gates", GATED_SITES, GATED_TYPES, "input > 0"),
    ("relu", Gated, "relu", ["relu@0", "relu@1"], ["ReLU", "ReLU"], "output > 0"),
    (
        "list",
        Gated,
        ["relu@1", "silu", "block.1"],
        ["relu@1", "silu", "block.1"],
        ["ReLU", "SiLU", "LeakyReLU"],
        "input > 0",
    ),
    ("list-one-relu-site", Gated, ["relu@0"], ["relu@0"], ["ReLU"], "input > 0"),
    ("in-place-gate", InPlace, "gates", ["2"], ["ELU"], "input > 0"),
    ("gelu-mlp", GeluOnly, "gates", ["2"], ["GELU"], "input > 0"),
]


def _use_model(monkeypatch: pytest.MonkeyPatch, factory: Factory) -> None:
    """Make gentrace's run build `factory(features, outputs)` instead of `model.arch`."""
    monkeypatch.setattr(run, "build_model", lambda cfg, shape, out: factory(int(np.prod(shape)), out))


def _layers(layers: Any) -> str:
    return f'"{layers}"' if isinstance(layers, str) else "[" + ", ".join(f'"{s}"' for s in layers) + "]"


def _gate_calls(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Site -> (input, output) [P, units] float64 of every gate module call in a plain eval forward of x.

    The input is copied in a pre-hook, before an in-place gate overwrites it.
    """
    calls: list[tuple[str, np.ndarray, np.ndarray]] = []
    pending: dict[str, np.ndarray] = {}
    gates = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, gates):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, i, n=name: pending.__setitem__(n, i[0].flatten(1).double().numpy().copy())
                )
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, n=name: calls.append((n, pending[n], o.flatten(1).double().numpy().copy()))
                )
            )
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    names = [n for n, _, _ in calls]
    seen: dict[str, int] = {}
    sites = {}
    for name, inp, out in calls:
        k = seen[name] = seen.get(name, -1) + 1
        sites[f"{name}@{k}" if names.count(name) > 1 else name] = (inp, out)
    return sites


@pytest.mark.parametrize(
    ("factory", "layers", "sites", "types", "bit"), [pytest.param(*c[1:], id=c[0]) for c in SITE_CASES]
)
def test_gate_bits_equal_packbits_of_a_plain_forward(
    monkeypatch: pytest.MonkeyPatch, factory: Factory, layers: Any, sites: list[str], types: list[str], bit: str
) -> None:
    _use_model(monkeypatch, factory)
    cfg = config.load(None, [*BASE, f"record.activations.layers={_layers(layers)}"])
    trainer, recorder, data = run.prepare(cfg, torch.device("cpu"))
    probe = next(p for p in recorder.probes if isinstance(p, ActivationsProbe))
    assert list(probe.sites) == sites
    assert [probe.sites[s]["module_type"] for s in sites] == types
    assert {probe.sites[s]["bit"] for s in sites} == {bit}
    (block,) = probe.at_step(0, 0)
    calls = _gate_calls(trainer.models[0], data.x_train[0][:13])
    for site in sites:
        inp, out = calls[site]
        on = inp > 0 if bit == "input > 0" else out > 0
        assert probe.sites[site]["units"] == on.shape[1]
        assert np.array_equal(block.arrays[f"acts/{site}/bits"][0], np.packbits(on, axis=-1, bitorder="little")), site
        values = block.arrays[f"acts/{site}/values"][0]
        np.testing.assert_allclose(values, out.astype(np.float16), rtol=0, atol=0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in trainer.models[0].modules())


def test_in_place_gate_bit_is_its_input_not_its_output() -> None:
    model = InPlace(4, 2).eval()
    x = torch.randn(64, 4)
    inp, out = _gate_calls(model, x)["2"]
    assert ((inp > 0) != (out > 0)).any()  # the case's bits would differ if read from the output


def test_call_sites_see_every_gate_type_once_per_call() -> None:
    sites = call_sites(Gated(4, 2).eval(), torch.randn(1, 4))
    assert list(sites) == GATED_SITES
    assert [info["module_type"] for info in sites.values()] == GATED_TYPES
    assert sites["relu@1"]["module"] == "relu"
    assert sites["block.1"]["units"] == 6
    assert list(relu_call_sites(Gated(4, 2).eval(), torch.randn(1, 4))) == ["relu@0", "relu@1"]


# (id, model, record.activations.layers, the one-line error)
SITE_ERRORS: list[tuple[str, Factory, Any, str]] = [
    (
        "unknown-site",
        Gated,
        ["silu", "relu"],
        "record.activations.layers: no gate call site 'relu'; call sites: gelu, silu, block.1, elu, relu@0, relu@1",
    ),
    (
        "no-gate-module",
        Gateless,
        "gates",
        "record.activations: the model has no nn.ReLU/LeakyReLU/GELU/SiLU/ELU module to record; "
        "set record.activations.every_epochs = 0",
    ),
    (
        "no-gate-module-list",
        Gateless,
        ["act"],
        "record.activations: the model has no nn.ReLU/LeakyReLU/GELU/SiLU/ELU module to record; "
        "set record.activations.every_epochs = 0",
    ),
    (
        "relu-without-nn-relu",
        GeluOnly,
        "relu",
        "record.activations: the model has no nn.ReLU module to record, but it has GELU modules: "
        'set record.activations.layers = "gates" to record them, or record.activations.every_epochs = 0',
    ),
    (
        "relu-without-any-gate",
        Gateless,
        "relu",
        "record.activations: the model has no nn.ReLU module to record; set record.activations.every_epochs = 0",
    ),
]


@pytest.mark.parametrize(("factory", "layers", "message"), [pytest.param(*c[1:], id=c[0]) for c in SITE_ERRORS])
def test_site_errors_name_the_key(monkeypatch: pytest.MonkeyPatch, factory: Factory, layers: Any, message: str) -> None:
    _use_model(monkeypatch, factory)
    cfg = config.load(None, [*BASE, f"record.activations.layers={_layers(layers)}"])
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$") as info:
        run.prepare(cfg, torch.device("cpu"))
    assert info.value.exit_code == 2


def test_analyze_paths_runs_on_a_gates_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _use_model(monkeypatch, Gated)
    cfg = config.load(None, [*BASE, 'record.activations={every_epochs=1, probe=13, layers="gates"}'])
    store = run.record(cfg, tmp_path / "s", device="cpu")
    reader = StoreReader(store)
    assert reader.act_layers() == GATED_SITES
    attrs = [reader.lazy(f"acts/{s}/bits").attrs for s in GATED_SITES]
    assert [(a["module_type"], a["bit"]) for a in attrs] == [(t, "input > 0") for t in GATED_TYPES]
    done = run_cli("analyze", "paths", "--kind", "cross", store)  # the command itself, once (a subprocess)
    assert done.returncode == 0, done.stderr
    cross = pd.read_csv(io.StringIO(done.stdout))
    assert list(dict.fromkeys(cross["layer"])) == GATED_SITES
    assert list(cross["epoch"].unique()) == [1, 2]
    for kind in ("overlap", "self", "rank"):
        table = paths.run(reader, kind=kind)
        assert list(dict.fromkeys(table["layer"])) == GATED_SITES, kind
        assert table["mean"].between(0, 1).all() if "mean" in table else len(table), kind


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


# -- the store-size estimate (gentrace.task.budget) sizes the recorded sites -----------------------

# (id, data set, [model] table): gentrace's architectures, whose every gate is an nn.ReLU
ARCHS: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp", "sinusoid", {"hidden": (7, 5)}),
    ("mlp-dropout", "digits", {"hidden": (6, 4), "dropout": 0.5}),
    ("cnn", "digits", {"channels": 3, "hidden": (9,)}),
    ("cnn-dropout-no-hidden", "digits", {"channels": 2, "hidden": (), "dropout": 0.1}),
    ("resnet18", "digits", {}),
    ("vgg11", "digits", {"hidden": (16, 8)}),
    ("alexnet", "digits", {"hidden": (16, 8)}),
]


@pytest.mark.parametrize(("arch", "data", "options"), ARCHS, ids=[a[0] for a in ARCHS])
def test_budget_gate_sites_are_the_built_models(arch: str, data: str, options: dict[str, Any]) -> None:
    cfg = config.from_dict({"data": {"name": data, "n_train": 10, "n_test": 10}, "model": {"arch": arch.split("-")[0]}})
    cfg = replace(cfg, model=replace(cfg.model, **options))
    shape = budget.input_shape(cfg)
    model = build_model(cfg.model, shape, budget.num_outputs(cfg)).eval()
    built = {site: info["units"] for site, info in call_sites(model, torch.zeros(1, *shape)).items()}
    assert built == {site: info["units"] for site, info in relu_call_sites(model, torch.zeros(1, *shape)).items()}
    estimate = budget.gate_sites(cfg)
    if arch.startswith(("mlp", "cnn")):
        assert estimate == built
    else:  # torchvision: the classifier's sites only, a lower bound
        assert estimate.items() <= built.items()
    for layers in ("relu", "gates"):
        acts = replace(cfg.record.activations, layers=layers)
        assert budget.act_units(replace(cfg, record=replace(cfg.record, activations=acts))) == list(estimate.values())
    listed = [*list(estimate)[-1:], "not-a-site"]
    acts = replace(cfg.record.activations, layers=tuple(listed))
    assert budget.act_units(replace(cfg, record=replace(cfg.record, activations=acts))) == list(estimate.values())[-1:]
