"""Small fake MNIST / FashionMNIST / CIFAR-10 files in torchvision's own on-disk formats.

The tests read them through the same code paths as the real files, without any download:

- MNIST, FashionMNIST: uncompressed idx (SN3 "Pascal Vincent") files under `root/<Class>/raw/`, the
  names torchvision's `MNIST._check_exists` looks for (it checks presence only, no md5).
- CIFAR-10: the python pickles `data_batch_1..5`, `test_batch`, `batches.meta` under
  `root/cifar-10-batches-py/`, each a dict with `data: [N, 3072] uint8` (channel-major rows) and
  `labels: list[int]`. Their md5s differ from the official ones, so torchvision's `CIFAR10` class
  rejects them; gentrace reads the pickles itself and never asks torchvision to verify them.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass(frozen=True)
class FakeSplits:
    """What was written: images `[N, C, H, W]` uint8 and labels `[N]` int64 of both splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _random_split(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    # every class present, in a shuffled order, so that class filters and relabelings are exercised
    y = rng.permutation(np.arange(n) % 10).astype(np.int64)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return x, y


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format: magic 0x0000 08 <ndim>, big-endian dims, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_mnist(
    root: Path, n_train: int = 60, n_test: int = 30, folder: str = "MNIST", seed: int = 0
) -> FakeSplits:
    """Write a fake MNIST (or, with folder="FashionMNIST", Fashion-MNIST) of 28x28 images under `root/folder/raw`."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    x_train, y_train = _random_split(rng, n_train, (28, 28))
    x_test, y_test = _random_split(rng, n_test, (28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", x_train)
    _write_idx(raw / "train-labels-idx1-ubyte", y_train.astype(np.uint8))
    _write_idx(raw / "t10k-images-idx3-ubyte", x_test)
    _write_idx(raw / "t10k-labels-idx1-ubyte", y_test.astype(np.uint8))
    return FakeSplits(x_train[:, None], y_train, x_test[:, None], y_test)


def write_fake_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> FakeSplits:
    """Write a fake CIFAR-10 (5 train batches of `per_batch` images, a test batch) under `root/cifar-10-batches-py`."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for b in range(1, 6):
        x, y = _random_split(rng, per_batch, (3, 32, 32))
        _write_batch(folder / f"data_batch_{b}", x, y, f"training batch {b} of 5")
        xs.append(x)
        ys.append(y)
    x_test, y_test = _random_split(rng, n_test, (3, 32, 32))
    _write_batch(folder / "test_batch", x_test, y_test, "testing batch 1 of 1")
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR_CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return FakeSplits(np.concatenate(xs), np.concatenate(ys), x_test, y_test)


def _write_batch(path: Path, x: np.ndarray, y: np.ndarray, label: str) -> None:
    entry = {
        "batch_label": label,
        "labels": [int(v) for v in y],
        "data": x.reshape(len(x), -1),  # [N, 3072]: 1024 red, then green, then blue values, row-major
        "filenames": [f"fake_{i}.png" for i in range(len(x))],
    }
    path.write_bytes(pickle.dumps(entry))
