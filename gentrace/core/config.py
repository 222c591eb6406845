"""Run configuration: the TOML file of SPEC section 2 as one tree of frozen dataclasses.

`load(path, overrides)` is the only way in: the file and every `--set key=value` override are
merged into one raw dict, then validated once, field by field, against the dataclass tree. Every
error names the key path (`train.lr`) and says how to fix it; nothing is written before this
succeeds. `to_dict(cfg)` gives the JSON-ready form stored in the run store's root attrs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from gentrace.core.errors import ConfigError, did_you_mean

DataName = Literal[
    "sinusoid",
    "ball-sinusoid",
    "cos2d",
    "product",
    "sparse-noise",
    "digits",
    "mnist",
    "fashion-mnist",
    "cifar10",
]
Task = Literal["multiclass", "0to4-vs-5to9", "animals-vs-objects", "first5-vs-last5", "dog-vs-airplane"]
Arch = Literal["mlp", "cnn", "resnet18", "vgg11", "alexnet"]


# float32's largest finite value: training runs in float32, and torch refuses an lr or a weight decay above it
FLOAT32_MAX = 3.4028234663852886e38
# more intra-op threads than any machine has cores is a typo
MAX_THREADS = 4096
# torch.manual_seed takes seeds in [-2**63, 2**64)
SEED_MAX = 2**64 - 1


def _check(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_min: bool = False,
    why: str = "",
) -> dict[str, Any]:
    """Field metadata: the allowed range of a number (checked by `_validate_range`); `why` explains the maximum."""
    return {"min": minimum, "max": maximum, "exclusive_min": exclusive_min, "why": why}


FLOAT32 = "the largest float32; training runs in float32"


@dataclass(frozen=True)
class DataConfig:
    """`[data]`: which data set, how many samples per replicate, label noise.

    `name` is a built-in set (DataName) or a factory `package.module:function` / `path/to/file.py:function`
    called with `options` as keyword arguments (gentrace.task.data); `num_classes` > 0 declares a
    factory's labels to be classes 0..num_classes-1 (0: from the labels' dtype).
    """

    name: str = "digits"
    options: dict[str, Any] = field(default_factory=dict)
    num_classes: int = field(default=0, metadata=_check(0))
    task: Task = "multiclass"
    root: str = "~/data"
    download: bool = False
    n_train: int = field(default=1000, metadata=_check(1))
    n_test: int = field(default=2000, metadata=_check(1))
    dim: int = field(default=100, metadata=_check(2))
    freq: float = field(default=0.5, metadata=_check(0.0, FLOAT32_MAX, exclusive_min=True, why=FLOAT32))
    label_noise: float = field(default=0.0, metadata=_check(0.0, 1.0))
    seed: int = field(default=0, metadata=_check(0))


@dataclass(frozen=True)
class ModelConfig:
    """`[model]`: architecture and initialization.

    `arch` is a built-in (Arch) or a factory `package.module:function` / `path/to/file.py:function`
    called as `function(input_shape, num_outputs, **options)` (gentrace.task.models). A factory's own
    initialization is kept unless `model.init` is given (the resolved config then says `default`).
    """

    arch: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)
    hidden: tuple[int, ...] = (512, 512)
    channels: int = field(default=16, metadata=_check(1))
    dropout: float = field(default=0.0, metadata=_check(0.0, 1.0))
    init: Literal["xavier_uniform", "default"] = "xavier_uniform"
    freeze: tuple[str, ...] = ()
    seed: int = field(default=0, metadata=_check(0, SEED_MAX, why="torch.manual_seed takes seeds below 2**64"))


@dataclass(frozen=True)
class LrDecay:
    """`train.lr_decay`: multiply the lr by `factor` every `every_epochs` epochs (0 = never)."""

    every_epochs: int = field(default=0, metadata=_check(0))
    factor: float = field(default=0.1, metadata=_check(0.0, FLOAT32_MAX, exclusive_min=True, why=FLOAT32))


@dataclass(frozen=True)
class TrainConfig:
    """`[train]`: optimizer, schedule, loss, number of replicates.

    `optimizer = "own"` marks a store recorded by `gentrace.Run` with the user's own optimizer (its class
    is in the store's `own_loop` attribute); `gentrace record` refuses it.
    """

    optimizer: Literal["sgd", "adam", "own"] = "sgd"
    lr: float = field(default=0.01, metadata=_check(0.0, FLOAT32_MAX, exclusive_min=True, why=FLOAT32))
    momentum: float = field(default=0.0, metadata=_check(0.0, 1.0))
    weight_decay: float = field(default=0.0, metadata=_check(0.0, FLOAT32_MAX, why=FLOAT32))
    batch_size: int = field(default=128, metadata=_check(0))
    epochs: int = field(default=50, metadata=_check(1))
    lr_decay: LrDecay = LrDecay()
    loss: Literal["auto", "cross_entropy", "bce", "mse"] = "auto"
    replicates: int = field(default=1, metadata=_check(1))
    threads: Literal["auto"] | int = "auto"


@dataclass(frozen=True)
class ParamsRecord:
    """`record.params`: every tensor (or the named ones) every N epochs; step 0 = initialization."""

    every_epochs: int = field(default=1, metadata=_check(0))
    names: Literal["all"] | tuple[str, ...] = "all"


@dataclass(frozen=True)
class ParamsFineRecord:
    """`record.params_fine`: a few tensors every N optimizer steps (0 = off)."""

    every_steps: int = field(default=1, metadata=_check(0))
    names: tuple[str, ...] = ("first_layer.bias",)


@dataclass(frozen=True)
class PredictionsRecord:
    """`record.predictions`: predicted class (or output) of every sample per split.

    At the end of every N-th epoch (`every_epochs`) and/or every N optimizer steps (`every_steps`,
    for the fine time resolution the increasing-complexity analyses want early in training); 0 = off.
    """

    every_epochs: int = field(default=1, metadata=_check(0))
    every_steps: int = field(default=0, metadata=_check(0))
    splits: tuple[Literal["train", "test"], ...] = ("train", "test")


@dataclass(frozen=True)
class GradMomentsRecord:
    """`record.grad_moments`: per-sample gradient moments (sum, sum of squares, sign counts) of every tensor.

    Recorded at steps 0, N, 2N, ... (`every_steps`) and/or at the end of every N-th epoch
    (`every_epochs`); 0 turns a cadence off. `source = "probe"`: an extra pass in eval mode over the
    replicate's training set (its first `samples` samples when > 0) with the parameters of that
    step. `source = "train-batches"`: accumulated from the training mini-batches since the
    previous row, no extra pass.
    """

    every_steps: int = field(default=0, metadata=_check(0))
    every_epochs: int = field(default=1, metadata=_check(0))
    source: Literal["probe", "train-batches"] = "probe"
    samples: int = field(default=0, metadata=_check(0))


@dataclass(frozen=True)
class ActivationsRecord:
    """`record.activations`: gate on/off bitmasks of a fixed probe set, every N epochs (0 = off).

    `probe`: the first P training samples of replicate 0 (a random draw from the pool; at most
    data.n_train, so a small run records all of its samples);
    `layers`: "relu" for every nn.ReLU call site (bit: output > 0); "gates" for every call site of
    an nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU or nn.ELU module (bit: input > 0, the same bit for a
    ReLU); or a list of call-site names of "gates" (bit: input > 0). Only modules can be hooked: a
    functional call (F.relu, torch.relu, x.clamp(min=0), F.gelu) records nothing;
    `values`: also store the gates' outputs themselves as float16.
    """

    every_epochs: int = field(default=1, metadata=_check(0))
    probe: int = field(default=128, metadata=_check(1))
    layers: Literal["relu", "gates"] | tuple[str, ...] = "relu"
    values: bool = False


@dataclass(frozen=True)
class LipschitzFineRecord:
    """`record.lipschitz_fine`: the local Lipschitz constant at the sampled training points, every N steps.

    Measured inside the training step (BTH paper, section 3): the norm of the input gradient of the
    model's output at each point of the batch; 0 = off.
    """

    every_steps: int = field(default=0, metadata=_check(0))


@dataclass(frozen=True)
class RecordConfig:
    """`[record]`: what is streamed into the store, and how often.

    `checkpoint_every_s`: a parameter snapshot carries a resume checkpoint (model, optimizer and
    RNG state) if at least this many seconds passed since the last one or since the run's start
    (the last snapshot always does; 0 = every snapshot, step 0's included). At most this much
    training is redone after a kill; a kill before the first checkpoint makes `--resume` start
    the run over, to the same result.

    `inputs`: also store the evaluated inputs themselves (`data/x_train` [M, n, *input_shape] and
    `data/x_test` [n_test, *input_shape], float32, written once) so that the analyses that need the
    inputs (lipschitz, the mi references) read them from the store instead of rebuilding the data set;
    the store grows by 4 bytes per input value (M * n + n_test samples).
    """

    eval_every_steps: int = field(default=0, metadata=_check(0))
    inputs: bool = False
    checkpoint_every_s: float = field(default=30.0, metadata=_check(0.0))
    params: ParamsRecord = ParamsRecord()
    params_fine: ParamsFineRecord = ParamsFineRecord()
    predictions: PredictionsRecord = PredictionsRecord()
    grad_moments: GradMomentsRecord = GradMomentsRecord()
    activations: ActivationsRecord = ActivationsRecord()
    lipschitz_fine: LipschitzFineRecord = LipschitzFineRecord()


@dataclass(frozen=True)
class RunConfig:
    """One run: the whole TOML file. `name` is the config file's stem (the quick start's is `quickstart`)."""

    name: str = "run"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    record: RecordConfig = RecordConfig()


QUICKSTART_TOML = """\
# gentrace quick start: the config `gentrace record` runs when given none.
# A 2-layer MLP on scikit-learn's bundled 8x8 digits, two replicates trained from one
# initialization on disjoint halves of 1000 training digits. Its store feeds gsnr, paths, mi,
# trajectory and lipschitz; not osgr, which needs the losses at every step (eval_every_steps = 1,
# as osgr-digits.toml records them); lipschitz_fine is off.
# Runs in about 10 s on a 2-core CPU.
name = "quickstart"

[data]
name = "digits"
n_train = 500
n_test = 797
seed = 0

[model]
arch = "mlp"
hidden = [128, 128]
seed = 0

[train]
optimizer = "sgd"
lr = 0.05
momentum = 0.9
batch_size = 32
epochs = 20
lr_decay = { every_epochs = 15, factor = 0.1 }
replicates = 2

[record]
eval_every_steps = 0
checkpoint_every_s = 30.0
params = { every_epochs = 1, names = "all" }
params_fine = { every_steps = 1, names = ["first_layer.bias"] }
predictions = { every_epochs = 1, splits = ["train", "test"] }
grad_moments = { every_steps = 0, every_epochs = 1, source = "probe", samples = 0 }
activations = { every_epochs = 1, probe = 128, layers = "relu", values = false }
"""


# Keys that only gentrace's own architectures read: refused next to a model factory.
BUILT_IN_MODEL_KEYS = ("hidden", "channels", "dropout")
FACTORY_KEYS = (("model", "arch"), ("data", "name"))  # layout: not a store name (config sections)


# `data.name`, `model.arch` and `train.optimizer` of a store recorded by `gentrace.Run` (a user's own loop):
# the data, the model or the optimizer were given in code, so gentrace cannot build them from the config.
OWN = "own"


def is_factory(name: str) -> bool:
    """Whether a `model.arch` / `data.name` value names a factory (`where:function`) rather than a built-in."""
    return ":" in name


def is_external(name: str) -> bool:
    """A `model.arch` / `data.name` that is not one of gentrace's built-ins: a factory, or `own` (given in code)."""
    return is_factory(name) or name == OWN


def split_factory(spec: str, key: str) -> tuple[str, str]:
    """`where:function` -> (where, function); the last colon splits, so a Windows drive letter survives."""
    where, _, function = spec.rpartition(":")
    if not where or not function.isidentifier():
        raise ConfigError(
            f"{key} = {spec!r}: expected 'package.module:function' or 'path/to/file.py:function' "
            "(a function name after the last colon)"
        )
    return where, function


def factory_is_file(where: str) -> bool:
    """A factory given by its source file (ends in .py or holds a path separator) rather than a module name."""
    return where.endswith(".py") or "/" in where or "\\" in where


def _absolute_factories(raw: dict[str, Any], base: Path) -> None:
    """Make a factory's relative file path absolute against `base` (the config file's folder), in place."""
    for section, name in FACTORY_KEYS:
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        spec = table.get(name)
        if not isinstance(spec, str) or not is_factory(spec):
            continue
        where, function = split_factory(spec, f"{section}.{name}")
        if factory_is_file(where) and not Path(where).expanduser().is_absolute():
            table[name] = f"{(base / where).resolve()}:{function}"


def load(path: Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML config (or the built-in quick start when `path` is None) and apply `--set` overrides."""
    if path is None:
        raw = tomllib.loads(QUICKSTART_TOML)
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a TOML text file (not UTF-8); give the run's .toml config") from None
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        raw.setdefault("name", Path(path).stem)
    for item in overrides:
        apply_override(raw, item)
    _absolute_factories(raw, Path(path).resolve().parent if path is not None else Path.cwd())
    return from_dict(raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], value); the value is read as TOML, else kept as a string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=0.1")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.split("."), value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set one `--set KEY=VALUE` into the raw config dict (creating tables on the way)."""
    parts, value = parse_override(item)
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {item!r}: {where} is a value, not a table")
        node = child
    node[parts[-1]] = value


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a raw (TOML-shaped) dict against the dataclass tree; errors name the key path."""
    cfg = _build(RunConfig, raw, "")
    _validate_names(cfg)
    model_raw = raw.get("model", {})
    if is_external(cfg.model.arch):
        given = [k for k in BUILT_IN_MODEL_KEYS if k in model_raw]
        if given:
            raise ConfigError(
                f"model.{given[0]} applies to gentrace's own architectures only; model.arch = {cfg.model.arch!r} "
                "is a factory: pass its settings in model.options instead"
            )
        if "init" not in model_raw:  # a factory's own initialization is kept unless model.init says otherwise
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="default"))
    elif cfg.model.options:
        raise ConfigError(f"model.options applies to a model factory; model.arch = {cfg.model.arch!r} is built in")
    if not is_external(cfg.data.name):
        if cfg.data.options:
            raise ConfigError(f"data.options applies to a data factory; data.name = {cfg.data.name!r} is built in")
        if cfg.data.num_classes:
            raise ConfigError(
                f"data.num_classes applies to a data factory; data.name = {cfg.data.name!r} knows its classes"
            )
    _validate_cross_fields(cfg)
    return cfg


def _validate_names(cfg: RunConfig) -> None:
    """`data.name` and `model.arch`: a built-in name, or a factory `where:function`."""
    for key, value, choices in (
        ("data.name", cfg.data.name, get_args(DataName)),
        ("model.arch", cfg.model.arch, get_args(Arch)),
    ):
        if is_factory(value):
            split_factory(value, key)
        elif value != OWN and value not in choices:
            raise ConfigError(
                f"{key} = {value!r} is not allowed; {did_you_mean(value, choices)}choose one of: {' | '.join(choices)} "
                "(or a factory: 'package.module:function' or 'path/to/file.py:function')"
            )


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON/TOML-ready data (tuples become lists).

    Keys that do not apply are left out: a factory model has no `hidden`, `channels`, `dropout`; a built-in
    one no `options`; a built-in data set no `options` or `num_classes` (so a built-in run's config reads
    as it did before factories existed).
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in _not_applying(cfg):
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def _not_applying(cfg: Any) -> tuple[str, ...]:
    if isinstance(cfg, ModelConfig):
        return BUILT_IN_MODEL_KEYS if is_external(cfg.arch) else ("options",)
    if isinstance(cfg, DataConfig) and not is_external(cfg.name):
        return ("options", "num_classes")
    return ()


def to_toml(cfg: RunConfig) -> str:
    """Write the resolved config as TOML (for `sample_configs/` and for humans)."""
    lines = [f"name = {toml_value(cfg.name)}"]
    for section, table in to_dict(cfg).items():
        if not isinstance(table, dict):
            continue
        lines.append(f"\n[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """A Python value (bool, str, number, list or tuple, dict) as a TOML value, e.g. for a `--set KEY=VALUE`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (once per class: a sweep validates thousands of configs)."""
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table, got {_describe(raw)}")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = _key(prefix, unknown[0])
        guess = did_you_mean(unknown[0], fields)
        raise ConfigError(f"unknown config key {key}; {guess}known keys here: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        key = _key(prefix, name)
        kwargs[name] = _coerce(hints[name], value, key)
        _validate_range(fields[name], kwargs[name], key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (lists -> tuples, int -> float)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool):
            options = " | ".join(str(c) for c in choices)
            guess = did_you_mean(value, map(str, choices)) if isinstance(value, str) else ""
            raise ConfigError(f"{key} = {value!r} is not allowed; {guess}choose one of: {options}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(" or ".join(dict.fromkeys(errors)))
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {_describe(value)}")
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table, e.g. {key} = {{ width = 64 }}, got {_describe(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {_describe(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float64
            number = math.inf
        if not math.isfinite(number):
            shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:8]}... ({len(str(value))} digits)"
            raise ConfigError(f"{key} = {shown} is not a finite number; give a finite {key}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not input


def _validate_range(f: dataclasses.Field[Any], value: Any, key: str) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is None and hi is None:
        return
    if value != value:  # NaN
        raise ConfigError(f"{key} = nan is not a number")
    if lo is not None and (value < lo or (f.metadata.get("exclusive_min") and value == lo)):
        bound = f"> {lo}" if f.metadata.get("exclusive_min") else f">= {lo}"
        raise ConfigError(f"{key} = {value} is impossible; it must be {bound}")
    if hi is not None and value > hi:
        why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
        bound = f"{hi:g}" if hi == FLOAT32_MAX else hi
        raise ConfigError(f"{key} = {value} is impossible; it must be <= {bound}{why}")


_BINARY_TASKS = {
    "0to4-vs-5to9": {"digits", "mnist", "fashion-mnist"},
    "animals-vs-objects": {"cifar10"},
    "first5-vs-last5": {"digits", "mnist", "fashion-mnist", "cifar10"},
    "dog-vs-airplane": {"cifar10"},
}
REGRESSION_SETS = {"cos2d", "product"}


def is_regression(data: DataConfig) -> bool:
    """Whether the data set's target is a real number (mse loss, float predictions)."""
    return data.name in REGRESSION_SETS


def _validate_cross_fields(cfg: RunConfig) -> None:
    """Checks that involve several keys (the data set size is checked when the data is built)."""
    data, train = cfg.data, cfg.train
    if isinstance(train.threads, int) and not 1 <= train.threads <= MAX_THREADS:
        raise ConfigError(
            f"train.threads = {train.threads} is impossible; give 1..{MAX_THREADS} threads, "
            "or auto to let gentrace choose"
        )
    if data.task != "multiclass" and data.name not in _BINARY_TASKS[data.task]:
        allowed = ", ".join(sorted(_BINARY_TASKS[data.task]))
        raise ConfigError(
            f"data.task = {data.task!r} does not apply to data.name = {data.name!r}; it applies to: {allowed}"
        )
    if is_regression(data):
        if train.loss in ("cross_entropy", "bce"):
            raise ConfigError(
                f"train.loss = {train.loss!r} needs classes, but {data.name} is a regression set; use mse or auto"
            )
        if data.label_noise > 0:
            raise ConfigError(f"data.label_noise applies to class labels only; {data.name} is a regression set")
    elif train.loss == "mse" and not is_external(data.name):  # a factory's targets are seen when it is called
        raise ConfigError(
            f"train.loss = 'mse' needs a regression set; {data.name} has classes: use cross_entropy, bce or auto"
        )
    if (
        train.loss == "bce"
        and data.task == "multiclass"
        and data.name not in ("sinusoid", "ball-sinusoid", "sparse-noise")
        and not is_external(data.name)
    ):
        raise ConfigError("train.loss = 'bce' needs two classes: set data.task to a binary relabeling")
    images = ("digits", "mnist", "fashion-mnist", "cifar10")
    if (
        cfg.model.arch in ("cnn", "resnet18", "vgg11", "alexnet")
        and data.name not in images
        and not is_external(data.name)
    ):
        raise ConfigError(f"model.arch = {cfg.model.arch!r} needs image data; {data.name} is a vector set: use mlp")
    if not cfg.model.hidden and cfg.model.arch == "mlp":
        raise ConfigError("model.hidden is empty; give at least one width, for example [128]")
    if any(width < 1 for width in cfg.model.hidden):
        raise ConfigError(f"model.hidden = {list(cfg.model.hidden)} is impossible; every width must be >= 1")
    decay = train.lr_decay
    decays = train.epochs // decay.every_epochs if decay.every_epochs else 0
    if decay.factor > 1 and math.log(train.lr) + decays * math.log(decay.factor) > math.log(FLOAT32_MAX):
        raise ConfigError(
            f"train.lr_decay.factor = {decay.factor} multiplies train.lr = {train.lr} by itself {decays} times "
            f"(every {decay.every_epochs} epochs), beyond float32's largest number ({FLOAT32_MAX:g}); "
            "use a factor below 1 (a decay) or a larger train.lr_decay.every_epochs"
        )
    grad = cfg.record.grad_moments
    if grad.samples > data.n_train:
        raise ConfigError(
            f"record.grad_moments.samples = {grad.samples} exceeds data.n_train = {data.n_train}; "
            "use at most n_train (0 = all)"
        )
    if grad.source == "train-batches" and grad.samples:
        raise ConfigError(
            "record.grad_moments.samples applies to source = 'probe' only; train-batches uses every batch"
        )
    acts = cfg.record.activations
    if acts.every_epochs and not acts.layers:
        raise ConfigError(
            'record.activations.layers = [] names no call site; give "relu", "gates" or call-site names, '
            "or set record.activations.every_epochs = 0"
        )
    if not cfg.name.strip() or "/" in cfg.name:
        raise ConfigError(f"name = {cfg.name!r} must be a non-empty word without '/' (it names the default store)")


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r}"
