"""Models of SPEC section 2: mlp, the 2-block cnn, torchvision's resnet18 / vgg11 / alexnet for small inputs.

`build_model(cfg, input_shape, out_dim)` returns a freshly initialized `nn.Module` mapping
`[B, *input_shape] -> [B, out_dim]`. It is deterministic given `cfg.seed` and runs under
`torch.random.fork_rng`, so the caller's global CPU RNG state is left exactly as it was.

Every nonlinearity is an `nn.ReLU` module with `inplace=False` (torchvision's in-place ReLUs are
switched off): the activation probes hook every `nn.ReLU` call site, and an in-place ReLU would
overwrite the tensor a hook has just seen.

Architectures (`model.arch`):

- `mlp`: `Linear-ReLU[-Dropout]` per width in `model.hidden`, then `Linear(out_dim)`, on the flattened
  input. Parameter names `0.weight, 0.bias, 2.weight, ...`, so `freeze = ["0."]` freezes the first layer.
- `cnn`: `conv3x3(p)-ReLU-maxpool2` twice (both blocks with `p = model.channels` channels), flatten,
  `Linear(hidden[0])` (128 when `model.hidden` is empty), ReLU, [Dropout], `Linear(out_dim)`.
- `resnet18`: torchvision's, with conv1 a 3x3 stride-1 conv on C channels and the stem maxpool removed
  (the usual CIFAR adaptation); conv1 has no bias, as in torchvision.
- `vgg11`, `alexnet`: torchvision's, first conv on C channels (alexnet's 11x11 stride-4 stem becomes
  3x3 stride 1), every maxpool that would shrink the map below 1x1 replaced by `nn.Identity`, the
  adaptive average pool set to 1x1, and the classifier rebuilt with the widths of `model.hidden` instead
  of 4096 (same layout and names as torchvision's for two widths) and dropout `model.dropout` instead of 0.5.

Init (`model.init`): `xavier_uniform` sets every Linear/Conv weight by `xavier_uniform_` and its bias to
zero (the increasing-complexity paper's setup); `default` keeps PyTorch's default init for mlp/cnn and
torchvision's own init rule for the torchvision archs. BatchNorm keeps weight 1, bias 0 either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from gentrace.core.config import OWN, ModelConfig, is_factory
from gentrace.core.errors import ConfigError
from gentrace.task import plugins

FIRST_LAYER_ALIASES = ("first_layer.weight", "first_layer.bias")


class MLP(nn.Sequential):
    """Fully connected ReLU network on flattened inputs: `[B, *input_shape] -> [B, out_dim]`."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten `x: [B, *input_shape]` and apply the layers; returns `[B, out_dim]`."""
        return super().forward(x.flatten(1))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    """Build and initialize the network `cfg.arch` for inputs `[B, *input_shape]` and `out_dim` outputs.

    Args:
        cfg: the `[model]` table.
        input_shape: one sample's shape, `(dim,)` for vector sets or `(C, H, W)` for images.
        out_dim: number of outputs (classes, 1 for bce or regression).

    Returns:
        The model in train mode, on the CPU. Same `cfg` -> identical parameters; the global RNG is untouched.
    """
    if cfg.arch == OWN:
        raise ConfigError(
            "model.arch = 'own' marks a model given in code to gentrace.Run; gentrace cannot build it: name a "
            "built-in architecture or a factory 'package.module:function'"
        )
    factory = is_factory(cfg.arch)
    if not factory and cfg.arch != "mlp" and len(input_shape) != 3:
        raise ConfigError(f"model.arch = {cfg.arch!r} needs image inputs (C, H, W), got shape {input_shape}; use mlp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _from_factory(cfg, input_shape, out_dim) if factory else _BUILDERS[cfg.arch](cfg, input_shape, out_dim)
        if cfg.init == "xavier_uniform":
            _xavier_uniform(model)
    for module in model.modules():
        if isinstance(module, nn.ReLU | nn.LeakyReLU | nn.ELU | nn.SiLU):
            module.inplace = False  # the activation hooks must see the tensor as the module made it
    return model.train()


def _from_factory(cfg: ModelConfig, input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    """`function(input_shape, num_outputs, **model.options)` of the factory `model.arch` (gentrace.task.plugins)."""
    model = plugins.call(cfg.arch, "model.arch", tuple(input_shape), out_dim, **cfg.options)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.arch = {cfg.arch!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if not any(True for _ in model.parameters()):
        raise ConfigError(f"model.arch = {cfg.arch!r}: the factory's {type(model).__name__} has no parameters")
    return model.cpu()


def first_layer_bias_name(model: nn.Module) -> str:
    """Name of the bias of the first layer that has parameters (`0.bias` for mlp and cnn)."""
    name, module = _first_layer(model)
    if not isinstance(getattr(module, "bias", None), nn.Parameter):
        raise ConfigError(
            f"the first layer of this model ({name}, a {type(module).__name__}) has no bias, so "
            f"'first_layer.bias' names nothing; record another parameter instead, e.g. {name}.weight"
        )
    return f"{name}.bias"


def resolve_names(model: nn.Module, names: Literal["all"] | Sequence[str], key: str) -> list[str]:
    """Turn a config list of parameter names into real names of `model.named_parameters()`.

    Args:
        model: the network.
        names: `"all"` (every parameter, in `named_parameters()` order) or a list of names; the aliases
            `first_layer.weight` / `first_layer.bias` stand for the first parameterized layer's tensors.
        key: the config key the names came from (e.g. `record.params_fine.names`), used in errors.

    Returns:
        Parameter names without duplicates, in the order given.
    """
    valid = [n for n, _ in model.named_parameters()]
    if names == "all":
        return valid
    resolved: list[str] = []
    for name in names:
        if name == "first_layer.weight":
            real = f"{_first_layer(model)[0]}.weight"
        elif name == "first_layer.bias":
            try:
                real = first_layer_bias_name(model)
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        elif name in valid:
            real = name
        else:
            shown = ", ".join(valid[:6]) + (", ..." if len(valid) > 6 else "")
            raise ConfigError(
                f"{key}: this model has no parameter {name!r}; valid names are {shown} ({len(valid)} in all), "
                f"or the aliases {', '.join(FIRST_LAYER_ALIASES)}"
            )
        if real not in resolved:
            resolved.append(real)
    return resolved


def apply_freeze(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Set `requires_grad = False` on every parameter whose name starts with one of `prefixes`.

    Returns:
        The frozen parameter names, in `named_parameters()` order.
    """
    params = dict(model.named_parameters())
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in params):
            tops = ", ".join(dict.fromkeys(name.rsplit(".", 1)[0] + "." for name in params))
            raise ConfigError(f"model.freeze: prefix {prefix!r} matches no parameter; names start with {tops}")
    frozen = [name for name in params if name.startswith(tuple(prefixes))]
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def _first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The first submodule (in registration order) that owns parameters itself; the model itself if none does.

    A model's own parameters (a class token, a positional embedding) do not make it its first layer.
    """
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    for name, module in owners:
        if name:
            return name, module
    if owners:
        return owners[0]
    raise ConfigError(f"this {type(model).__name__} has no parameters")


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    return MLP(math.prod(input_shape), cfg.hidden, out_dim, cfg.dropout)


def _cnn(cfg: ModelConfig, input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    c, h, w = input_shape
    p = cfg.channels
    width = cfg.hidden[0] if cfg.hidden else 128
    if min(h, w) < 4:
        raise ConfigError(f"model.arch = 'cnn' pools twice by 2 and needs images of at least 4x4, got {h}x{w}")
    layers: list[nn.Module] = [
        nn.Conv2d(c, p, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(p, p, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(p * (h // 4) * (w // 4), width),
        nn.ReLU(),
    ]
    if cfg.dropout > 0:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _resnet18(cfg: ModelConfig, input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    from torchvision.models import resnet18

    with torch.device("meta"):  # skip the allocation and init of layers that are replaced anyway
        model = resnet18(weights=None, num_classes=out_dim)
        model.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return _materialize(model, _torchvision_resnet_init)


def _vgg11(cfg: ModelConfig, input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    from torchvision.models import vgg11

    with torch.device("meta"):
        model = vgg11(weights=None)
        model.features[0] = nn.Conv2d(input_shape[0], 64, 3, padding=1)
        channels = _shrink_pools(model.features, input_shape)
        model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        layers: list[nn.Module] = []
        width = channels
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        model.classifier = nn.Sequential(*layers, nn.Linear(width, out_dim))
    return _materialize(model, _torchvision_vgg_init)


def _alexnet(cfg: ModelConfig, input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    from torchvision.models import alexnet

    with torch.device("meta"):
        model = alexnet(weights=None)
        model.features[0] = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1)
        channels = _shrink_pools(model.features, input_shape)
        model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        layers: list[nn.Module] = []
        width = channels
        for h in cfg.hidden:
            layers += [nn.Dropout(cfg.dropout), nn.Linear(width, h), nn.ReLU()]
            width = h
        model.classifier = nn.Sequential(*layers, nn.Linear(width, out_dim))
    return _materialize(model, None)


def _shrink_pools(features: nn.Sequential, input_shape: tuple[int, ...]) -> int:
    """Replace the max pools that would see a map smaller than their kernel by Identity; returns out channels."""
    x = torch.empty(1, *input_shape, device="meta")  # meta: shapes only, no compute
    for i, layer in enumerate(features):
        if isinstance(layer, nn.MaxPool2d):
            k = layer.kernel_size if isinstance(layer.kernel_size, int) else min(layer.kernel_size)
            if min(x.shape[-2:]) < k:
                features[i] = nn.Identity()
                continue
        x = layer(x)
    return int(x.shape[1])


def _materialize(model: nn.Module, arch_init: Callable[[nn.Module], None] | None) -> nn.Module:
    """Allocate a meta-device model on the CPU, then give every tensor PyTorch's (and the arch's) init."""
    model = model.to_empty(device="cpu")
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()  # also resets BatchNorm's running statistics, left uninitialized by to_empty
    if arch_init is not None:
        for module in model.modules():
            arch_init(module)
    return model


def _torchvision_resnet_init(m: nn.Module) -> None:
    """The ResNet init rule of torchvision (resnet.py): kaiming-normal convs, BatchNorm 1/0, default Linear."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _torchvision_vgg_init(m: nn.Module) -> None:
    """The VGG init rule of torchvision (vgg.py): kaiming-normal convs, N(0, 0.01) Linear weights, zero biases."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        nn.init.zeros_(m.bias)


def _xavier_uniform(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


_BUILDERS: dict[str, Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet18": _resnet18,
    "vgg11": _vgg11,
    "alexnet": _alexnet,
}
