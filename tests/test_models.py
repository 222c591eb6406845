"""build_model and the parameter-name helpers: every arch on every input shape, init, freeze, names."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gentrace.core.config import ModelConfig
from gentrace.core.errors import ConfigError
from gentrace.task.models import MLP, apply_freeze, build_model, first_layer_bias_name, resolve_names

ARCHS = ["mlp", "cnn", "resnet18", "vgg11", "alexnet"]
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
CASES = [(arch, shape) for arch in ARCHS for shape in SHAPES]
IDS = [f"{arch}-{'x'.join(map(str, shape))}" for arch, shape in CASES]


def small(arch: str, **kw: object) -> ModelConfig:
    base: dict[str, object] = {"arch": arch, "hidden": (32, 16), "channels": 4}
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("arch", "shape"), CASES, ids=IDS)
def test_forward_shape(arch: str, shape: tuple[int, ...]) -> None:
    model = build_model(small(arch), shape, 10)
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()  # every parameter takes part
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_single_output(arch: str) -> None:
    model = build_model(small(arch), (1, 8, 8), 1)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 1)


def test_mlp_on_vectors() -> None:
    model = build_model(small("mlp"), (5,), 3)
    assert isinstance(model, MLP)
    assert isinstance(model, nn.Sequential)
    assert model(torch.rand(7, 5)).shape == (7, 3)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_mlp_dropout_layers() -> None:
    model = build_model(small("mlp", dropout=0.5), (5,), 3)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model[2].p == 0.5


def test_cnn_layout() -> None:
    model = build_model(small("cnn", channels=6, hidden=()), (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 6, (3, 3), (1, 1)),
        (6, 6, (3, 3), (1, 1)),
    ]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(6 * 8 * 8, 128), (128, 10)]


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_names_and_relu_modules(arch: str) -> None:
    model = build_model(small(arch), (3, 32, 32), 10)
    names = [n for n, _ in model.named_parameters()]
    expected_first = {
        "mlp": "0.weight",
        "cnn": "0.weight",
        "resnet18": "conv1.weight",
        "vgg11": "features.0.weight",
        "alexnet": "features.0.weight",
    }[arch]
    assert names[0] == expected_first
    if arch in ("vgg11", "alexnet"):  # torchvision's classifier names for two hidden widths
        assert names[-6:] == [
            "classifier.1.weight" if arch == "alexnet" else "classifier.0.weight",
            "classifier.1.bias" if arch == "alexnet" else "classifier.0.bias",
            "classifier.4.weight" if arch == "alexnet" else "classifier.3.weight",
            "classifier.4.bias" if arch == "alexnet" else "classifier.3.bias",
            "classifier.6.weight",
            "classifier.6.bias",
        ]
    if arch == "resnet18":
        assert "layer1.0.conv1.weight" in names
        assert names[-2:] == ["fc.weight", "fc.bias"]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus
    assert not any(m.inplace for m in relus)


def test_small_inputs_drop_pools() -> None:
    vgg = build_model(small("vgg11"), (1, 8, 8), 10)
    pools = [m for m in vgg.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # 8 -> 4 -> 2 -> 1, the last two pools would go below 1x1
    big = build_model(small("vgg11"), (3, 32, 32), 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in big.features) == 5
    resnet = build_model(small("resnet18"), (1, 8, 8), 10)
    assert isinstance(resnet.maxpool, nn.Identity)
    assert resnet.conv1.stride == (1, 1)
    assert resnet.conv1.in_channels == 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["xavier_uniform", "default"])
def test_same_seed_same_parameters(arch: str, init: str) -> None:
    a = build_model(small(arch, init=init, seed=3), (1, 8, 8), 4)
    b = build_model(small(arch, init=init, seed=3), (1, 8, 8), 4)
    c = build_model(small(arch, init=init, seed=4), (1, 8, 8), 4)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_model(small("cnn"), (1, 8, 8), 4)
    build_model(small("resnet18"), (1, 8, 8), 4)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_xavier_uniform_init(arch: str) -> None:
    model = build_model(small(arch, init="xavier_uniform"), (3, 32, 32), 10)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            w = module.weight.detach()
            receptive = w[0][0].numel() if w.dim() > 2 else 1
            bound = math.sqrt(6.0 / (w.shape[0] * receptive + w.shape[1] * receptive))
            assert float(w.abs().max()) <= bound + 1e-7
            assert float(w.abs().max()) > 0.8 * bound
            if module.bias is not None:
                assert not module.bias.any()


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "alexnet"])
def test_default_init_is_initialized(arch: str) -> None:
    # built on the meta device and materialized: nothing may be left as uninitialized memory
    model = build_model(small(arch, init="default"), (3, 32, 32), 10)
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean))
            assert torch.equal(module.running_var, torch.ones_like(module.running_var))
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert not module.bias.any()
    stds = [float(m.weight.detach().std()) for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(s > 0.001 for s in stds)


def test_default_differs_from_xavier() -> None:
    a = build_model(small("mlp", init="default"), (5,), 3)
    b = build_model(small("mlp", init="xavier_uniform"), (5,), 3)
    assert a[0].bias.any()
    assert not b[0].bias.any()


def test_freeze() -> None:
    model = build_model(small("mlp"), (5,), 3)
    frozen = apply_freeze(model, ["0.", "4.bias"])
    assert frozen == ["0.weight", "0.bias", "4.bias"]
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(frozen)


def test_freeze_prefix_matching_nothing() -> None:
    model = build_model(small("vgg11"), (1, 8, 8), 3)
    with pytest.raises(ConfigError, match=r"model\.freeze.*'layer1\.'.*features\.0\.") as info:
        apply_freeze(model, ["features.0.", "layer1."])
    assert "\n" not in str(info.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen on error


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("mlp", "0.bias"), ("cnn", "0.bias"), ("vgg11", "features.0.bias"), ("alexnet", "features.0.bias")],
)
def test_first_layer_bias_name(arch: str, expected: str) -> None:
    assert first_layer_bias_name(build_model(small(arch), (1, 8, 8), 3)) == expected


def test_first_layer_without_bias() -> None:
    model = build_model(small("resnet18"), (1, 8, 8), 3)
    with pytest.raises(ConfigError, match=r"conv1.*no bias.*conv1\.weight"):
        first_layer_bias_name(model)


def test_resolve_names() -> None:
    model = build_model(small("cnn"), (1, 8, 8), 3)
    assert resolve_names(model, "all", "record.params.names") == [n for n, _ in model.named_parameters()]
    assert resolve_names(model, ["first_layer.bias", "3.weight", "0.bias"], "k") == ["0.bias", "3.weight"]
    assert resolve_names(model, ["first_layer.weight"], "k") == ["0.weight"]


def test_resolve_names_unknown() -> None:
    model = build_model(small("mlp"), (5,), 3)
    with pytest.raises(ConfigError, match=r"record\.params_fine\.names.*'1\.weight'.*0\.weight") as info:
        resolve_names(model, ["1.weight"], "record.params_fine.names")
    assert "\n" not in str(info.value)


def test_resolve_first_layer_alias_without_bias_names_key() -> None:
    model = build_model(small("resnet18"), (1, 8, 8), 3)
    with pytest.raises(ConfigError, match=r"^record\.params_fine\.names: .*no bias"):
        resolve_names(model, ["first_layer.bias"], "record.params_fine.names")
    assert resolve_names(model, ["first_layer.weight"], "k") == ["conv1.weight"]


def test_vector_input_for_image_arch() -> None:
    with pytest.raises(ConfigError, match=r"model\.arch = 'cnn'.*mlp"):
        build_model(small("cnn"), (100,), 2)
