"""Data sets of SPEC section 2: the papers' synthetic sets, scikit-learn's digits, torchvision image sets.

`build_data(cfg, replicates)` returns one `Dataset`: M = `replicates` disjoint training subsets of
`cfg.n_train` samples each (one per replicate model), one shared test set, and the label-noise mask.
Everything is deterministic given `cfg.seed`. Independent NumPy streams are spawned from it for the
task (directions, embedding), the train pool, the test pool, the subset choice and the label noise, so
e.g. changing `label_noise` changes only labels, and replicate m's samples do not depend on M.

Synthetic sets (`train_index` / `test_index` are positions in the generated train / test pools):

- `sinusoid`: x ~ N(0, I_dim), y = 1[<w, x> + sin<w', x> > 0] with w, w' orthonormal
  (increasing-complexity paper, section 3, task (iv)).
- `ball-sinusoid`: x uniform in the unit disk (dim 2), y = 1[x_1 > 0.25 sin(2 pi x_0)], then each label
  flipped with probability 0.1 in train and test alike: that noise is part of the distribution (paper, Fig. 1),
  not of `noise_mask`.
- `cos2d`: u uniform in [0, 1]^2, x = Q u with Q a random [dim, 2] matrix with orthonormal columns
  (an isometry, `cos2d_map`), y = cos(2 pi f u_0) cos(2 pi f u_1) (BTH paper, task 1). Regression.
- `product`: x uniform in [-1, 1]^2, y = x_0 x_1 + eps, eps uniform in [-0.01, 0.01]. Regression.
- `sparse-noise`: y uniform in {-1, +1}, x = eta y e_1 + e_k with k uniform among the other dim - 1
  coordinates and eta = -1 with probability 0.1, else +1 (paper, section 5: eta ~ Bernoulli(p) over {+-1},
  p = 0.1 here, so the best classifier, sign(x_1), has accuracy 0.9). Class = (y + 1) / 2.

`data.dim` sets the input dimension of sinusoid, cos2d and sparse-noise; ball-sinusoid and product are 2-d.

Real sets, all as float32 in [0, 1] with shape (C, H, W):

- `digits`: scikit-learn's 1797 8x8 digits (pixels / 16). There is no official test split: one seeded
  permutation of the 1797 gives the test set (its first n_test) and then the M training subsets, so
  `train_index` and `test_index` index the same pool.
- `mnist`, `fashion-mnist`: torchvision's MNIST / FashionMNIST under `data.root` (raw idx files).
- `cifar10`: the python pickles of `data.root/cifar-10-batches-py`, read here in torchvision's layout
  (torchvision's own loader insists on the md5 of the official files; we check that only when downloading).
  Training subsets come from the official train split, the test set from the official test split.

Tasks relabel to {0, 1}: `0to4-vs-5to9` and `first5-vs-last5` send classes 0-4 to 0 and 5-9 to 1;
`animals-vs-objects` sends the animals bird, cat, deer, dog, frog, horse (2-7) to 0 and the vehicles
airplane, automobile, ship, truck (0, 1, 8, 9) to 1; `dog-vs-airplane` keeps only airplane (-> 0) and
dog (-> 1) before subsets are drawn.

Label noise p: in each replicate exactly round(p n) training samples (round half up), chosen uniformly,
get a uniformly random class (which may equal the true one); `noise_mask` marks them. Test labels are
never noised.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gentrace.core.config import OWN, DataConfig, is_factory, is_regression
from gentrace.core.errors import ConfigError, DataError
from gentrace.task import plugins

BALL_SINUSOID_AMPLITUDE = 0.25
BALL_SINUSOID_OMEGA = 2 * np.pi
BALL_SINUSOID_FLIP = 0.1
SPARSE_NOISE_P = 0.1
DIGITS_SIZE = 1797

# stream ids for np.random.SeedSequence(cfg.seed, spawn_key=(id,))
_TASK, _TRAIN, _TEST, _SUBSET, _NOISE = range(5)
_SYNTHETIC = ("sinusoid", "ball-sinusoid", "cos2d", "product", "sparse-noise")
_ANIMALS = (2, 3, 4, 5, 6, 7)  # CIFAR-10 bird, cat, deer, dog, frog, horse
_CIFAR_AIRPLANE, _CIFAR_DOG = 0, 5


@dataclass(frozen=True, eq=False)
class Dataset:
    """Training subsets of M replicates and one test set (eq=False: fields are tensors).

    Attributes:
        x_train: `[M, n, *input_shape]` float32.
        y_train: `[M, n]` int64 labels after label noise, or float32 regression targets.
        x_test: `[n_test, *input_shape]` float32.
        y_test: `[n_test]` int64 or float32.
        train_index: `[M, n]` int64, each training sample's index in the source's train split (sorted per row).
        test_index: `[n_test]` int64, index in the source's test split (sorted).
        noise_mask: `[M, n]` bool, True where label noise replaced the label.
        num_classes: number of classes, 0 for regression sets.
        input_shape: `(dim,)` for vector sets, `(C, H, W)` for images.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: np.ndarray
    test_index: np.ndarray
    noise_mask: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]


def build_data(cfg: DataConfig, replicates: int) -> Dataset:
    """Build the data set `cfg.name` for `replicates` models, each with its own `cfg.n_train` samples."""
    if replicates < 1:
        raise ConfigError(f"train.replicates = {replicates} is impossible; it must be >= 1")
    if cfg.name == OWN:
        raise ConfigError(
            "data.name = 'own' marks data given in code to gentrace.Run; gentrace cannot build it: name a "
            "built-in set or a factory 'package.module:function'"
        )
    if is_regression(cfg) and cfg.label_noise > 0:
        raise ConfigError(f"data.label_noise applies to class labels only; {cfg.name} is a regression set")
    if cfg.name in _SYNTHETIC and cfg.task != "multiclass":
        raise ConfigError(f"data.task = {cfg.task!r} does not apply to the synthetic set {cfg.name}; use multiclass")
    if is_factory(cfg.name):
        ds = _from_factory(cfg, replicates)
    elif cfg.name in _SYNTHETIC:
        ds = _synthetic(cfg, replicates)
    elif cfg.name == "digits":
        ds = _digits(cfg, replicates)
    else:
        ds = _torchvision(cfg, replicates)
    if cfg.label_noise == 0:
        return ds
    if ds.num_classes == 0:
        raise ConfigError(f"data.label_noise applies to class labels only; {cfg.name} returned float targets")
    y_noisy, mask = _label_noise(ds.y_train.numpy(), cfg.label_noise, ds.num_classes, _rng(cfg, _NOISE))
    return Dataset(
        ds.x_train,
        torch.from_numpy(y_noisy),
        ds.x_test,
        ds.y_test,
        ds.train_index,
        ds.test_index,
        mask,
        ds.num_classes,
        ds.input_shape,
    )


def _from_factory(cfg: DataConfig, m: int) -> Dataset:
    """A user's data set: `function(**data.options) -> (train, test)`, then subsets as for torchvision's sets.

    Each split is a pair `(x, y)` of tensors or arrays, or a map-style torch Dataset of `(x, y)` items
    (stacked here). Inputs become float32 (uint8 ones scaled to [0, 1], as images are). Labels: an integer
    (or bool) dtype means classes 0..K-1 with K = `data.num_classes` or the largest label + 1; a float dtype
    means regression targets, unless `data.num_classes` is given (then the floats must be whole numbers).
    The training subsets are drawn from the train split, the test set from the test split, with the same
    seeded permutations as the built-in image sets; `train_index` / `test_index` index the user's splits.
    """
    returned = plugins.call(cfg.name, "data.name", **cfg.options)
    key = f"data.name = {cfg.name!r}"
    if not isinstance(returned, tuple | list) or len(returned) != 2:
        raise ConfigError(
            f"{key}: the factory must return (train, test), got {type(returned).__name__}"
            + (f" of length {len(returned)}" if isinstance(returned, tuple | list) else "")
        )
    if any(torch.is_tensor(part) or isinstance(part, np.ndarray) for part in returned):
        raise ConfigError(
            f"{key}: the factory must return (train, test), each an (x, y) pair or a Dataset; it returned a pair "
            "of arrays (one split?)"
        )
    x_tr, y_tr = _factory_split(returned[0], "train", key)
    x_te, y_te = _factory_split(returned[1], "test", key)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ConfigError(
            f"{key}: train inputs have shape {tuple(x_tr.shape[1:])} per sample but test inputs "
            f"{tuple(x_te.shape[1:])}; both splits need the same input shape"
        )
    classes = cfg.num_classes > 0 or not (y_tr.is_floating_point() or y_te.is_floating_point())
    c_tr, c_te = (
        (_factory_classes(y_tr, key, "train"), _factory_classes(y_te, key, "test")) if classes else (None, None)
    )
    if c_tr is not None and c_te is not None:
        top = int(max(c_tr.max(initial=0), c_te.max(initial=0)))
        k = cfg.num_classes or top + 1
        if top >= k:
            raise ConfigError(f"{key}: a label is >= data.num_classes = {k}; labels must lie in 0..{k - 1}")
    source = "the train split of the factory's data"
    if c_tr is None or c_te is None:
        return _draw(cfg, m, (x_tr, y_tr, x_te, y_te), None, source, "samples")
    splits = (x_tr, torch.from_numpy(c_tr), x_te, torch.from_numpy(c_te))
    return _draw(cfg, m, splits, np.arange(k, dtype=np.int64), source, "samples")


_INTEGER = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _factory_split(split: object, name: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of a data factory -> (x [N, ...] float32 or uint8, y [N]): a pair of arrays or a map-style Dataset."""
    if isinstance(split, tuple | list) and len(split) == 2:
        xs, ys = split
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        xs, ys = _stack_items(split, name, key)
    else:
        raise ConfigError(
            f"{key}: the {name} split must be (x, y) arrays or a map-style torch Dataset of (x, y) items, "
            f"got {type(split).__name__}"
        )
    if not torch.is_tensor(ys) and np.asarray(ys).dtype.kind not in "biuf":
        raise ConfigError(
            f"{key}: the {name} split's labels are {np.asarray(ys).dtype}; give integer classes or float targets"
        )
    try:
        x = xs if torch.is_tensor(xs) else torch.as_tensor(np.asarray(xs))
        y = ys if torch.is_tensor(ys) else torch.as_tensor(np.asarray(ys))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{key}: the {name} split's x or y is not an array ({exc})") from None
    if x.ndim < 2 or len(x) == 0:
        raise ConfigError(f"{key}: the {name} split's x has shape {tuple(x.shape)}; expected [N, *input_shape], N > 0")
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(
            f"{key}: the {name} split has {len(x)} inputs but labels of shape {tuple(y.shape)}; "
            "give one label per input"
        )
    if not (y.is_floating_point() or y.dtype in _INTEGER):
        raise ConfigError(f"{key}: the {name} split's labels are {y.dtype}; give integer classes or float targets")
    if not (x.is_floating_point() or x.dtype in _INTEGER):
        raise ConfigError(f"{key}: the {name} split's inputs are {x.dtype}; give real numbers")
    return (x if x.dtype == torch.uint8 else x.to(torch.float32)), y


def _stack_items(dataset: Any, name: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (x, y) item of a map-style data set, stacked: x [N, ...], y [N]."""
    try:
        items = [dataset[i] for i in range(len(dataset))]
        xs = torch.stack([torch.as_tensor(np.asarray(item[0])) for item in items])
        ys = torch.as_tensor(np.asarray([np.asarray(item[1]) for item in items]))
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as exc:
        raise ConfigError(
            f"{key}: the {name} split is a data set whose items are not (input, label) pairs of tensors or "
            f"arrays of one shape ({str(exc).splitlines()[0][:120]}); give it a transform that returns tensors"
        ) from None
    return xs, ys


def _factory_classes(y: torch.Tensor, key: str, name: str) -> np.ndarray:
    """Labels as int64 classes; whole numbers >= 0 only."""
    values = y.to(torch.float64).numpy() if y.is_floating_point() else y.to(torch.int64).numpy()
    if y.is_floating_point() and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise ConfigError(
            f"{key}: data.num_classes is set but the {name} labels are not whole numbers; give integer classes"
        )
    if values.size and values.min() < 0:
        raise ConfigError(f"{key}: the {name} split has a negative label ({values.min():g}); classes are 0..K-1")
    return values.astype(np.int64)


def sinusoid_directions(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The orthonormal directions `w, w': [dim] float64` of the `sinusoid` set for `cfg.seed`."""
    q, _ = np.linalg.qr(_rng(cfg, _TASK).standard_normal((cfg.dim, 2)))
    return q[:, 0], q[:, 1]


def cos2d_map(cfg: DataConfig) -> np.ndarray:
    """The isometry `Q: [dim, 2]` float64 (orthonormal columns) embedding the `cos2d` square, x = Q u."""
    q, _ = np.linalg.qr(_rng(cfg, _TASK).standard_normal((cfg.dim, 2)))
    return q


def _rng(cfg: DataConfig, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(stream,)))


def _synthetic(cfg: DataConfig, m: int) -> Dataset:
    n = cfg.n_train
    x_tr, y_tr = _sample(cfg, _rng(cfg, _TRAIN), m * n)
    x_te, y_te = _sample(cfg, _rng(cfg, _TEST), cfg.n_test)
    regression = is_regression(cfg)
    y_dtype = torch.float32 if regression else torch.int64
    return Dataset(
        x_train=torch.from_numpy(x_tr.astype(np.float32)).reshape(m, n, -1),
        y_train=torch.from_numpy(y_tr).to(y_dtype).reshape(m, n),
        x_test=torch.from_numpy(x_te.astype(np.float32)),
        y_test=torch.from_numpy(y_te).to(y_dtype),
        train_index=np.arange(m * n, dtype=np.int64).reshape(m, n),
        test_index=np.arange(cfg.n_test, dtype=np.int64),
        noise_mask=np.zeros((m, n), dtype=bool),
        num_classes=0 if regression else 2,
        input_shape=(x_tr.shape[1],),
    )


def _sample(cfg: DataConfig, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` samples of a synthetic set: x `[n, dim]` float64 and y `[n]` (class in {0, 1} or float64 target)."""
    if cfg.name == "sinusoid":
        w, w2 = sinusoid_directions(cfg)
        x = rng.standard_normal((n, cfg.dim))
        return x, (x @ w + np.sin(x @ w2) > 0).astype(np.int64)
    # one draw of [n, k] uniforms per set: sample i then depends on the stream's first i rows only,
    # so the first replicate's samples are the same whatever the number of replicates
    if cfg.name == "ball-sinusoid":
        r = rng.random((n, 3))
        radius, angle = np.sqrt(r[:, 0]), 2 * np.pi * r[:, 1]  # sqrt: uniform in area
        x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        y = (x[:, 1] > BALL_SINUSOID_AMPLITUDE * np.sin(BALL_SINUSOID_OMEGA * x[:, 0])).astype(np.int64)
        return x, np.where(r[:, 2] < BALL_SINUSOID_FLIP, 1 - y, y)
    if cfg.name == "cos2d":
        u = rng.random((n, 2))
        y = np.cos(2 * np.pi * cfg.freq * u[:, 0]) * np.cos(2 * np.pi * cfg.freq * u[:, 1])
        return u @ cos2d_map(cfg).T, y
    if cfg.name == "product":
        r = rng.uniform(-1.0, 1.0, (n, 3))
        return r[:, :2], r[:, 0] * r[:, 1] + 0.01 * r[:, 2]
    # sparse-noise
    r = rng.random((n, 3))
    sign = np.where(r[:, 0] < 0.5, -1.0, 1.0)
    eta = np.where(r[:, 1] < SPARSE_NOISE_P, -1.0, 1.0)
    k = 1 + np.minimum((r[:, 2] * (cfg.dim - 1)).astype(np.int64), cfg.dim - 2)  # uniform in 1 .. dim-1
    x = np.zeros((n, cfg.dim))
    x[:, 0] = eta * sign
    x[np.arange(n), k] = 1.0
    return x, (sign > 0).astype(np.int64)


@functools.cache
def _digits_pool() -> tuple[torch.Tensor, torch.Tensor]:
    """All of scikit-learn's digits: `x: [1797, 1, 8, 8]` float32 in [0, 1], `y: [1797]` int64 (read once)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    return x, torch.from_numpy(bunch.target.astype(np.int64))


def _digits(cfg: DataConfig, m: int) -> Dataset:
    need = m * cfg.n_train + cfg.n_test
    if need > DIGITS_SIZE:
        raise ConfigError(
            f"data.n_train = {cfg.n_train} with {m} replicate(s) and data.n_test = {cfg.n_test} needs "
            f"{m} x {cfg.n_train} + {cfg.n_test} = {need} digits, but the digits set has {DIGITS_SIZE}; "
            f"lower data.n_train, data.n_test or train.replicates"
        )
    x, y = _digits_pool()
    perm = _rng(cfg, _SUBSET).permutation(DIGITS_SIZE)
    test_index = np.sort(perm[: cfg.n_test])
    train_index = np.sort(perm[cfg.n_test : need].reshape(m, cfg.n_train), axis=1)
    label_map = _label_map(cfg.task)
    return _gather(x, y, x, y, train_index, test_index, label_map)


def _torchvision(cfg: DataConfig, m: int) -> Dataset:
    root = Path(cfg.root).expanduser()
    if cfg.name == "cifar10":
        x_tr, y_tr, x_te, y_te = _load_cifar10(root, cfg.download)
    else:
        x_tr, y_tr, x_te, y_te = _load_mnist(cfg.name, root, cfg.download)
    what = cfg.name if cfg.task == "multiclass" else f"{cfg.name} ({cfg.task})"
    return _draw(cfg, m, (x_tr, y_tr, x_te, y_te), _label_map(cfg.task), f"the train split of {what}", "images")


def _draw(
    cfg: DataConfig,
    m: int,
    splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    label_map: np.ndarray | None,
    source: str,
    unit: str,
) -> Dataset:
    """M seeded disjoint training subsets of the train split and the test set from the test split.

    `splits` = (x_tr, y_tr, x_te, y_te); `label_map` relabels classes (-1 drops a class from the pools);
    None: float regression targets, every sample in the pools. `source` and `unit` name them in errors.
    """
    x_tr, y_tr, x_te, y_te = splits
    if label_map is None:
        train_pool, test_pool = np.arange(len(x_tr)), np.arange(len(x_te))
    else:
        train_pool = np.flatnonzero(label_map[y_tr.numpy()] >= 0)
        test_pool = np.flatnonzero(label_map[y_te.numpy()] >= 0)
    if m * cfg.n_train > len(train_pool):
        raise ConfigError(
            f"data.n_train = {cfg.n_train} with {m} replicate(s) needs {m * cfg.n_train} training {unit}, but "
            f"{source} has {len(train_pool)}; lower data.n_train or train.replicates"
        )
    if cfg.n_test > len(test_pool):
        test_source = source.replace("the train split", "the test split", 1)
        raise ConfigError(
            f"data.n_test = {cfg.n_test} is more than the {len(test_pool)} {unit} of {test_source}; lower data.n_test"
        )
    train_index = _rng(cfg, _SUBSET).permutation(train_pool)[: m * cfg.n_train].reshape(m, cfg.n_train)
    test_index = _rng(cfg, _TEST).permutation(test_pool)[: cfg.n_test]
    return _gather(x_tr, y_tr, x_te, y_te, np.sort(train_index, axis=1), np.sort(test_index), label_map)


def _gather(
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_te: torch.Tensor,
    y_te: torch.Tensor,
    train_index: np.ndarray,
    test_index: np.ndarray,
    label_map: np.ndarray | None,
) -> Dataset:
    """Pick the subsets from the pools (`x: [N, *shape]` uint8 or float32), scale uint8 to [0, 1], relabel.

    `label_map` None: float regression targets, kept as float32 (num_classes 0).
    """

    def images(x: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        picked = x[torch.from_numpy(index)]
        return picked.float().div_(255.0) if picked.dtype == torch.uint8 else picked

    def labels(y: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        if label_map is None:
            return y[torch.from_numpy(index)].to(torch.float32)
        return torch.from_numpy(label_map[y.numpy()[index]])

    m, n = train_index.shape
    return Dataset(
        x_train=images(x_tr, train_index),
        y_train=labels(y_tr, train_index),
        x_test=images(x_te, test_index),
        y_test=labels(y_te, test_index),
        train_index=train_index.astype(np.int64),
        test_index=test_index.astype(np.int64),
        noise_mask=np.zeros((m, n), dtype=bool),
        num_classes=0 if label_map is None else int(label_map.max()) + 1,
        input_shape=tuple(x_tr.shape[1:]),
    )


def _label_map(task: str) -> np.ndarray:
    """Original class (0-9) -> task label; -1 drops the class from the pools."""
    classes = np.arange(10)
    if task in ("0to4-vs-5to9", "first5-vs-last5"):
        return (classes >= 5).astype(np.int64)
    if task == "animals-vs-objects":
        return (~np.isin(classes, _ANIMALS)).astype(np.int64)
    if task == "dog-vs-airplane":
        label_map = np.full(10, -1, dtype=np.int64)
        label_map[_CIFAR_AIRPLANE], label_map[_CIFAR_DOG] = 0, 1
        return label_map
    return classes


def _label_noise(y: np.ndarray, p: float, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace round(p n) labels per row of `y: [M, n]` by uniform random classes; returns (labels, mask)."""
    m, n = y.shape
    count = int(np.floor(p * n + 0.5))
    mask = np.zeros((m, n), dtype=bool)
    noisy = y.copy()
    for row in range(m):  # row by row: replicate m's noise does not depend on the number of replicates
        picked = rng.choice(n, size=count, replace=False)
        mask[row, picked] = True
        noisy[row, picked] = rng.integers(0, num_classes, size=count)
    return noisy, mask


def _load_mnist(name: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST or FashionMNIST through torchvision: `x: [N, 1, 28, 28]` uint8, `y: [N]` int64, train then test."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    raw = root / cls.__name__ / "raw"
    files = [Path(filename).stem for filename, _md5 in cls.resources]  # without .gz: torchvision reads them so
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError) as exc:  # torchvision asserts the format
        if download:
            raise DataError(f"could not download or read {cls.__name__} in {raw}: {exc!r}") from None
        missing = [f for f in files if not (raw / f).is_file()]
        if not missing:
            raise DataError(f"could not read {cls.__name__} from {raw}: {exc!r}") from None
        raise DataError(
            f"{cls.__name__} not found under {raw}: missing {', '.join(missing)}; put these idx files there "
            f"(gunzip the .gz downloads), or set data.download = true"
        ) from None
    return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long()


def _load_cifar10(root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-10 python pickles in torchvision's layout: `x: [N, 3, 32, 32]` uint8, `y: [N]` int64, train then test."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    if download:
        try:  # fetches the archive and checks its md5 (and every batch's) when absent
            CIFAR10(str(root), train=True, download=True)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"could not download CIFAR-10 into {folder}: {exc}") from None
    batches = [name for name, _md5 in CIFAR10.train_list + CIFAR10.test_list]
    missing = [name for name in batches if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found under {folder}: missing {', '.join(missing)}; extract cifar-10-python.tar.gz "
            f"into {root} (it unpacks to {CIFAR10.base_folder}/), or set data.download = true"
        )

    def read(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")  # the official pickles come from Python 2
                images = entry["data"]  # layout: not a store name (the CIFAR-10 pickle key)
                xs.append(np.asarray(images, dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(entry["labels"], dtype=np.int64))
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
                raise DataError(f"could not read CIFAR-10 batch {folder / name}: {exc!r}") from None
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    x_tr, y_tr = read([name for name, _md5 in CIFAR10.train_list])
    x_te, y_te = read([name for name, _md5 in CIFAR10.test_list])
    return x_tr, y_tr, x_te, y_te


def from_splits(train: object, test: object, replicates: int, key: str = "gentrace.Run") -> Dataset:
    """A data set given in code (gentrace.Run): the training split(s) and the test split the probes evaluate.

    Args:
        train: one split for every replicate, or a list of `replicates` splits of one length (each an
            (x, y) pair of tensors or arrays, or a map-style Dataset of (x, y) items, stacked here).
        test: the test split, shared by every replicate.
        replicates: M, the models recorded side by side.
        key: what the errors name (the argument of the call).

    Inputs become float32 (uint8 ones scaled to [0, 1], as images are). Integer (or bool) labels are
    classes 0..K-1 (K = the largest label + 1 of both splits); float labels are regression targets.
    `train_index` / `test_index` number the samples of the given splits (0..n-1).
    """
    per_replicate = list(train) if isinstance(train, list) and len(train) == replicates and replicates > 1 else None
    parts = [_factory_split(t, "train", f"{key} train") for t in per_replicate] if per_replicate else None
    x_tr, y_tr = parts[0] if parts else _factory_split(train, "train", f"{key} train")
    x_te, y_te = _factory_split(test, "test", f"{key} test")
    xs, ys = ([p[0] for p in parts], [p[1] for p in parts]) if parts else ([x_tr] * replicates, [y_tr] * replicates)
    if any(x.shape != x_tr.shape for x in xs):
        raise ConfigError(f"{key} train: the replicates' training splits differ in shape; give them one length")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ConfigError(
            f"{key}: train inputs have shape {tuple(x_tr.shape[1:])} per sample but test inputs "
            f"{tuple(x_te.shape[1:])}; both splits need the same input shape"
        )
    regression = y_tr.is_floating_point() or y_te.is_floating_point()
    if regression:
        labels_tr, label_te = [y.to(torch.float32) for y in ys], y_te.to(torch.float32)
        classes = 0
    else:
        labels_tr = [torch.from_numpy(_factory_classes(y, key, "train")) for y in ys]
        label_te = torch.from_numpy(_factory_classes(y_te, key, "test"))
        classes = int(max(max(int(y.max()) for y in labels_tr), int(label_te.max()))) + 1

    def real(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)

    n = len(x_tr)
    return Dataset(
        x_train=torch.stack([real(x) for x in xs]),
        y_train=torch.stack(labels_tr),
        x_test=real(x_te),
        y_test=label_te,
        train_index=np.tile(np.arange(n, dtype=np.int64), (replicates, 1)),
        test_index=np.arange(len(x_te), dtype=np.int64),
        noise_mask=np.zeros((replicates, n), dtype=bool),
        num_classes=classes,
        input_shape=tuple(int(s) for s in x_tr.shape[1:]),
    )
