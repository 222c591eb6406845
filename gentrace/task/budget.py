"""Refuse absurd sizes before anything is allocated: a run's host memory and store size, estimated from its config.

`train.epochs = 100000000` builds step schedules of 10^9 entries, `model.hidden = [100000000]` a
billion-parameter network, `sweep --grid data.seed=0..100000000` 10^8 configs: each would take a shared
machine's memory (or fill its disk) before failing. `check(cfg, out)` estimates, from the config alone
(no torch, no data), what the run would hold in memory and write to its store, and raises ConfigError
naming the key to lower when either exceeds this machine's physical memory or the free space where
the store goes. The estimates err on the low side (float32 parameters do not compress, integer streams
are counted at a quarter of their raw size, a file takes at least one block; only the largest buffers
are counted), so what is refused could not have run, and what fits is never refused.

Parameter counts are exact for every architecture of gentrace.task.models (tests/test_bad_inputs.py
compares them with the built networks); the torchvision backbones are constants.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from gentrace.core.config import RunConfig, is_external, is_regression
from gentrace.core.errors import ConfigError
from gentrace.core.schedules import timeline
from gentrace.store import schema
from gentrace.store.schema import ACTS, GRAD, LIPSCHITZ_FINE, METRICS, METRICS_FINE, PARAMS, PARAMS_FINE, PREDS

F32 = 4  # bytes of float32 (parameters, snapshots, gradient moments)
SCHEDULE_ENTRY_BYTES = 100  # one recorded step in a probe's Python set and list of steps (int, hash slot, pointer)
CHECKPOINTS_KEPT = schema.CHECKPOINTS_KEPT  # resume checkpoints a store holds at once (the newest two)
BLOCK = 4096  # bytes a file takes on disk at least (a file system block)
POINT_BYTES = 1600  # memory of one sweep point: its values, validated config, store name and manifest entry
MIN_STORE_FILES = 24  # files of any store: root, data/, metrics/, metrics_fine/ metadata and their first chunks
INT_COMPRESSION = 4  # integer streams (classes, bit masks, indices) compress at least this much with blosc (bitshuffle)

# one sample's shape per data set; synthetic vector sets of fixed width have it here, the others use data.dim
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
FIXED_DIM = {"ball-sinusoid": 2, "product": 2}
# samples in the whole pool of an image set (train + test): what its loader holds in memory
POOL_SIZES = {"digits": 1797, "mnist": 70_000, "fashion-mnist": 70_000, "cifar10": 60_000}
TRAIN_SIZES = {"digits": 1797, "mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000}
# parameters of the torchvision backbones that do not depend on the config (all but the first conv and the
# classifier), counted from the built models of gentrace.task.models
BACKBONE = {"resnet18": 11_167_104, "vgg11": 9_218_688, "alexnet": 2_446_400}
BACKBONE_OUT = {"resnet18": 512, "vgg11": 512, "alexnet": 256}  # features entering the classifier


@dataclasses.dataclass(frozen=True)
class Part:
    """One item of an estimate: what it is, its bytes, and the config key that makes it this large."""

    what: str
    nbytes: int
    key: str


Estimate = Callable[[RunConfig], "list[Part]"]


def input_shape(cfg: RunConfig) -> tuple[int, ...]:
    """One sample's shape: `(C, H, W)` for image sets, `(dim,)` for vector sets."""
    name = cfg.data.name
    if name in IMAGE_SHAPES:
        return IMAGE_SHAPES[name]
    return (FIXED_DIM.get(name, cfg.data.dim),)


def num_outputs(cfg: RunConfig) -> int:
    """Units of the model's last layer: classes for cross-entropy, 1 for bce and regression."""
    if is_regression(cfg.data) or cfg.train.loss == "bce":
        return 1
    binary = cfg.data.task != "multiclass" or cfg.data.name not in IMAGE_SHAPES
    return 2 if binary else 10


def parameter_sizes(cfg: RunConfig) -> dict[str, int]:
    """Parameter name -> element count of the model `cfg.model` builds (`<backbone>`: torchvision's fixed part)."""
    arch, hidden, out = cfg.model.arch, cfg.model.hidden, num_outputs(cfg)
    shape = input_shape(cfg)
    sizes: dict[str, int] = {}
    if arch == "mlp":
        step = 3 if cfg.model.dropout > 0 else 2  # Linear, ReLU[, Dropout] per hidden width
        width = math.prod(shape)
        for i, h in enumerate(hidden):
            sizes |= {f"{i * step}.weight": width * h, f"{i * step}.bias": h}
            width = h
        return sizes | {f"{len(hidden) * step}.weight": width * out, f"{len(hidden) * step}.bias": out}
    c = shape[0]
    if arch == "cnn":
        p, (h, w), fc = cfg.model.channels, shape[1:], hidden[0] if hidden else 128
        last = 10 if cfg.model.dropout > 0 else 9
        return {
            "0.weight": p * c * 9,
            "0.bias": p,
            "3.weight": p * p * 9,
            "3.bias": p,
            "7.weight": p * (h // 4) * (w // 4) * fc,
            "7.bias": fc,
            f"{last}.weight": fc * out,
            f"{last}.bias": out,
        }
    if arch == "resnet18":
        width = BACKBONE_OUT[arch]
        return {"conv1.weight": 64 * c * 9, "<backbone>": BACKBONE[arch], "fc.weight": width * out, "fc.bias": out}
    sizes = {"features.0.weight": 64 * c * 9, "features.0.bias": 64, "<backbone>": BACKBONE[arch]}
    width, offset = BACKBONE_OUT[arch], 0 if arch == "vgg11" else 1  # alexnet: Dropout before each Linear
    for i, h in enumerate(hidden):
        sizes |= {f"classifier.{3 * i + offset}.weight": width * h, f"classifier.{3 * i + offset}.bias": h}
        width = h
    return sizes | {f"classifier.{3 * len(hidden)}.weight": width * out, f"classifier.{3 * len(hidden)}.bias": out}


def gate_sites(cfg: RunConfig) -> dict[str, int]:
    """Call site -> units per sample of every gate module of the model `cfg.model` builds, in call order.

    gentrace's architectures gate with nn.ReLU only, so `record.activations.layers` "relu" and "gates"
    record these same sites. Torchvision archs: the classifier's only (the backbone's are left out), a
    lower bound; resnet18 has none outside its backbone.
    """
    arch, hidden = cfg.model.arch, cfg.model.hidden
    if arch == "mlp":
        step = 3 if cfg.model.dropout > 0 else 2  # Linear, ReLU[, Dropout] per hidden width
        return {str(i * step + 1): h for i, h in enumerate(hidden)}
    if arch == "cnn":
        p, (_, h, w) = cfg.model.channels, input_shape(cfg)
        return {"1": p * h * w, "4": p * (h // 2) * (w // 2), "8": hidden[0] if hidden else 128}
    if arch == "resnet18":
        return {}
    offset = 1 if arch == "vgg11" else 2  # vgg: Linear, ReLU, Dropout; alexnet: Dropout, Linear, ReLU
    return {f"classifier.{3 * i + offset}": h for i, h in enumerate(hidden)}


def relu_units(cfg: RunConfig) -> list[int]:
    """Units per sample of each ReLU call site (see `gate_sites`)."""
    return list(gate_sites(cfg).values())


def act_units(cfg: RunConfig) -> list[int]:
    """Units per sample of each call site `record.activations.layers` records (listed names it cannot size: 0)."""
    sites, layers = gate_sites(cfg), cfg.record.activations.layers
    if isinstance(layers, str):  # "relu" and "gates" are the same sites in gentrace's architectures
        return list(sites.values())
    return [sites[layer] for layer in dict.fromkeys(layers) if layer in sites]


def _count(every: int, end: int) -> int:
    """len(schedules.every_epochs/every_steps(every, ...)) for `end` epochs or steps, without building the list."""
    return 0 if every == 0 else end // every + 1 + (1 if end % every else 0)


def _named(sizes: dict[str, int], names: str | Sequence[str]) -> int:
    """Elements of the named tensors (`all`, real names or the first_layer aliases); unknown names count 0."""
    if names == "all":
        return sum(sizes.values())
    first = next(iter(sizes))
    aliases = {"first_layer.weight": first, "first_layer.bias": first.rsplit(".", 1)[0] + ".bias"}
    return sum(sizes.get(aliases.get(name, name), 0) for name in dict.fromkeys(names))


def _named_count(sizes: dict[str, int], names: str | Sequence[str]) -> int:
    """How many tensors `names` selects (see `_named`)."""
    return len(sizes) if names == "all" else len(set(names))


def _rows(cfg: RunConfig) -> dict[schema.Stream, int]:
    """Rows of every stream the config records (streams it does not record: 0), in `schema.STREAMS` order."""
    rec, tl = cfg.record, timeline(_n_train(cfg), cfg.train.batch_size, cfg.train.epochs)
    epochs, steps = tl.epochs, tl.total_steps
    return {
        METRICS: epochs + 1 if rec.eval_every_steps == 0 else _count(rec.eval_every_steps, steps),
        METRICS_FINE: steps,
        PARAMS: _count(rec.params.every_epochs, epochs),
        PARAMS_FINE: _count(rec.params_fine.every_steps, steps),
        PREDS: _count(rec.predictions.every_epochs, epochs) + _count(rec.predictions.every_steps, steps),
        GRAD: _count(rec.grad_moments.every_epochs, epochs) + _count(rec.grad_moments.every_steps, steps),
        ACTS: _count(rec.activations.every_epochs, epochs),
        LIPSCHITZ_FINE: _count(rec.lipschitz_fine.every_steps, steps),
    }


def _n_train(cfg: RunConfig) -> int:
    """Training samples per replicate; an image set's own size bounds it (more is refused when the data is read)."""
    return min(cfg.data.n_train, TRAIN_SIZES.get(cfg.data.name, cfg.data.n_train))


def _n_test(cfg: RunConfig) -> int:
    return min(cfg.data.n_test, POOL_SIZES.get(cfg.data.name, cfg.data.n_test))


def store_parts(cfg: RunConfig) -> list[Part]:
    """Bytes on disk of each stream of the store, at least (see the module docstring)."""
    m, rows, sizes = cfg.train.replicates, _rows(cfg), parameter_sizes(cfg)
    n, n_test, p = _n_train(cfg), _n_test(cfg), sum(sizes.values())
    rec = cfg.record
    pred_bytes = F32 if is_regression(cfg.data) else 2 / INT_COMPRESSION  # float32 outputs or int16 classes
    split_samples = {"train": m * n, "test": m * n_test}
    units = act_units(cfg)
    probe = min(rec.activations.probe, n)
    act_row = probe * sum(math.ceil(u / 8) for u in units) / INT_COMPRESSION
    if rec.activations.values:
        act_row += probe * sum(units) * 2  # float16
    optimizer_slots = _optimizer_slots(cfg)
    row_bytes: dict[schema.Stream, float] = {
        METRICS: 20 + 4 * m * F32,
        METRICS_FINE: 16 + 2 * m * F32,
        PARAMS: m * F32 * _named(sizes, rec.params.names),
        PARAMS_FINE: m * F32 * _named(sizes, rec.params_fine.names),
        PREDS: pred_bytes * sum(split_samples[s] for s in rec.predictions.splits),
        GRAD: m * p * (2 * F32 + 2 * F32 / INT_COMPRESSION),  # sum, sumsq float32; pos, neg int32
        ACTS: act_row,
        LIPSCHITZ_FINE: 8 + 2 * m * F32,
    }
    # the key to lower: the stream's config key, or what sizes its rows when that is not the schedule
    keys = {
        **{stream: stream.config_key for stream in rows},
        METRICS_FINE: "train.epochs",
        PREDS: "record.predictions",
        GRAD: "record.grad_moments",
        ACTS: "record.activations",
    }
    # at least one chunk file per array in the per-row streams (rows pack several to a chunk, up to
    # schema.PACKED_CHUNK_BYTES): at least a file system block each
    files = {
        PARAMS: 1 + _named_count(sizes, rec.params.names),
        GRAD: 3 + 4 * len(sizes),
        PREDS: 1 + len(rec.predictions.splits),
        ACTS: 2 + len(units) * (2 if rec.activations.values else 1),
    }
    parts = [
        Part(f"{s.name} ({rows[s]} rows)", int(max(rows[s] * row_bytes[s], files.get(s, 0) * BLOCK)), keys[s])
        for s in rows
        if rows[s]
    ]
    if rec.inputs:  # data/x_train, data/x_test float32; image pixels take few values and compress like integers
        per_value = F32 / INT_COMPRESSION if cfg.data.name in IMAGE_SHAPES else F32
        values = (m * n + n_test) * math.prod(input_shape(cfg))
        parts.append(Part("stored inputs (record.inputs)", int(values * per_value), _data_key(cfg)))
    if rows[PARAMS]:  # every parameter snapshot can carry one; the newest CHECKPOINTS_KEPT stay
        checkpoints = CHECKPOINTS_KEPT * m * p * F32 * (1 + optimizer_slots)
        parts.append(Part("resume checkpoints", checkpoints, _model_key(cfg)))
    return parts


def memory_parts(cfg: RunConfig, *, gpu: bool = False) -> list[Part]:
    """Bytes of host memory the run holds at once, at least; `gpu`: models, gradients and activations live there."""
    m, sizes, rows = cfg.train.replicates, parameter_sizes(cfg), _rows(cfg)
    p = sum(sizes.values())
    optimizer_slots = _optimizer_slots(cfg)
    grad_moments = rows[GRAD] > 0
    # built once on the CPU and copied per replicate; a snapshot row and a checkpoint on their way to the store
    per_param = F32 * (2 + m * (2 + optimizer_slots) + (4 * m if grad_moments else 0))
    if not gpu:  # each replicate's own copy, gradient and optimizer state; float64 moment accumulators
        per_param += F32 * m * (2 + optimizer_slots) + (32 * m if grad_moments else 0)
    # every probe keeps the set of its recorded steps (grad moments also the params schedule)
    entries = sum(rows[s] for s in rows if s != METRICS_FINE) + (rows[PARAMS] if grad_moments else 0)
    features = math.prod(input_shape(cfg))
    if cfg.data.name in POOL_SIZES:  # the whole image set is read: uint8 files (digits: float64) made float32
        data_bytes = POOL_SIZES[cfg.data.name] * features * (F32 + (8 if cfg.data.name == "digits" else 1))
    else:  # drawn in float64, kept in float32
        data_bytes = (m * cfg.data.n_train + cfg.data.n_test) * features * (8 + F32)
    parts = [
        Part(f"{p} parameters x {m} replicate(s)", p * per_param, _model_key(cfg)),
        Part(f"schedules of {entries} recorded steps", entries * SCHEDULE_ENTRY_BYTES, "train.epochs"),
        Part("the data set", data_bytes, _data_key(cfg)),
    ]
    if not gpu:  # a training batch's ReLU outputs, their masks and gradients
        batch = min(cfg.train.batch_size or cfg.data.n_train, cfg.data.n_train)
        parts.append(Part("activations", 3 * F32 * m * batch * sum(relu_units(cfg)), _model_key(cfg)))
    return parts


def _optimizer_slots(cfg: RunConfig) -> int:
    """Tensors of optimizer state per parameter: adam's two moments, sgd's momentum buffer."""
    return 2 if cfg.train.optimizer == "adam" else int(cfg.train.momentum > 0)


def _model_key(cfg: RunConfig) -> str:
    """The key that sizes the network: a cnn's second conv grows with model.channels^2, classifiers with hidden."""
    model = cfg.model
    if model.arch == "cnn":
        sizes = parameter_sizes(cfg)
        return "model.channels" if sizes["3.weight"] > sizes["7.weight"] else "model.hidden"
    return "model.hidden" if model.hidden and model.arch != "resnet18" else "train.replicates"


def _data_key(cfg: RunConfig) -> str:
    data, m = cfg.data, cfg.train.replicates
    sizes = {"data.n_train": m * data.n_train, "data.n_test": data.n_test}
    if data.name not in IMAGE_SHAPES and data.name not in FIXED_DIM:
        sizes["data.dim"] = data.dim
    return max(sizes, key=lambda k: sizes[k])


def uses_gpu(device: str) -> bool:
    """Whether `--device` puts the models on a GPU (`auto`: when torch sees one; torch is imported only then)."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return bool(torch.cuda.is_available())


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: Path) -> int | None:
    """Free bytes on the file system that `path` (or its nearest existing ancestor) is on."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def size(nbytes: float) -> str:
    """Bytes in binary units: `412.3 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} PiB"


def _value(cfg: RunConfig, key: str) -> str:
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    if isinstance(node, tuple):
        return str(list(node))
    return "" if node is None or dataclasses.is_dataclass(node) else str(node)


def _culprit(cfg: RunConfig, parts: Sequence[Part], limit: int, redo: Estimate) -> tuple[str, str]:
    """(`key = value` to name, what to lower): the largest part's key, or the multiplier that alone is too large.

    train.epochs multiplies every stream's rows and train.replicates every row: when the same run with
    one epoch (or one replicate) would fit, that key is the one to name.
    """
    top = max(parts, key=lambda part: part.nbytes).key
    train = cfg.train
    for key, fewer in (
        ("train.epochs", dataclasses.replace(train, epochs=1)),
        ("train.replicates", dataclasses.replace(train, replicates=1)),
    ):
        smaller = dataclasses.replace(cfg, train=fewer)
        if top != key and fewer != train and sum(part.nbytes for part in redo(smaller)) <= limit:
            return f"{key} = {_value(cfg, key)}", f"{key} or {top}"
    value = _value(cfg, top)
    return (f"{top} = {value}" if value else top), top


def _breakdown(parts: Sequence[Part], shown: int = 3) -> str:
    top = sorted(parts, key=lambda part: -part.nbytes)[:shown]
    return ", ".join(f"{part.what}: {size(part.nbytes)}" for part in top)


def check(cfg: RunConfig, out: Path, *, gpu: bool = False) -> None:
    """Raise ConfigError naming the key when the run cannot fit this machine's memory or the disk at `out`."""
    check_many([cfg], out, gpu=gpu)


def check_many(cfgs: Sequence[RunConfig], out: Path, *, gpu: bool = False, what: str = "--grid") -> None:
    """Check runs recorded one after another into stores under `out` (a sweep): each must fit memory, all the disk.

    Raises:
        ConfigError: naming the key to lower (or `what`, the sweep's grid, when only the sum is too large).
    """
    # a factory's (or own) model or data is known only once it is built: `gentrace check` measures those runs instead
    cfgs = [cfg for cfg in cfgs if not (is_external(cfg.model.arch) or is_external(cfg.data.name))]
    ram = physical_memory()
    for cfg in cfgs:
        parts = memory_parts(cfg, gpu=gpu)
        need = sum(part.nbytes for part in parts)
        if ram is not None and need > ram:
            named, lower = _culprit(cfg, parts, ram, lambda c: memory_parts(c, gpu=gpu))
            raise ConfigError(
                f"{named} is too large for this machine: the run would need at least {size(need)} of memory "
                f"({_breakdown(parts)}), more than its {size(ram)}; lower {lower}"
            )
    free = free_disk(out)
    if free is None or not cfgs:
        return
    per_store = [store_parts(cfg) for cfg in cfgs]
    need = sum(part.nbytes for parts in per_store for part in parts)
    if need <= free:
        return
    largest = max(range(len(cfgs)), key=lambda i: sum(part.nbytes for part in per_store[i]))
    cfg, parts = cfgs[largest], per_store[largest]
    alone = sum(part.nbytes for part in parts)
    where = f"{out} ({size(free)} free)"
    if len(cfgs) > 1 and alone <= free:
        raise ConfigError(
            f"{what}: the sweep's {len(cfgs)} stores would take at least {size(need)} on disk, more than is free "
            f"at {where}; give fewer grid values, or record less (largest store: {_breakdown(parts, 2)})"
        )
    named, lower = _culprit(cfg, parts, free, store_parts)
    raise ConfigError(
        f"{named} is too large: the store would take at least {size(alone)} on disk ({_breakdown(parts)}), "
        f"more than is free at {where}; lower {lower}"
    )


def check_points(count: int, key: str, out: Path | None = None) -> None:
    """Raise ConfigError when a sweep of `count` points cannot fit this machine (`key`: its largest grid).

    Memory: each point's config is built before the first is recorded. Disk (with `out`): each point
    is a store of at least MIN_STORE_FILES files. Both are known before a single point is validated.
    """
    ram = physical_memory()
    if ram is not None and count * POINT_BYTES > ram:
        raise ConfigError(
            f"--grid {key}: the sweep would have {count} points, whose configs alone need at least "
            f"{size(count * POINT_BYTES)} of memory, more than this machine's {size(ram)}; give fewer values"
        )
    free = free_disk(out) if out is not None else None
    if free is not None and count * MIN_STORE_FILES * BLOCK > free:
        raise ConfigError(
            f"--grid {key}: the sweep's {count} stores would take at least {size(count * MIN_STORE_FILES * BLOCK)} "
            f"on disk (a store has at least {MIN_STORE_FILES} files), more than is free at {out} ({size(free)}); "
            "give fewer values"
        )
