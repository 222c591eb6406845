"""Stores of any size written straight through the store writer (no training): grad, acts and preds streams.

Used by the bounded-memory and dask tests and by benchmarks/scale.py. Every row repeats a small
random pattern shifted per row, so the arrays are as large as asked (logical bytes) but compress
well on disk and write fast; the values are arbitrary, the analyses only have to read them all.
A `linear` mi reference is cached in the store, so `mi` runs without rebuilding a data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gentrace.analyses import mi_references
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.store.writer import RowBlock, create_store

PATTERN = 4096  # values in the repeated random pattern


@dataclass(frozen=True)
class Size:
    """Shape of a synthetic store: `rows` recorded rows in each of the grad, acts and preds streams."""

    rows: int
    params: int  # elements of the one gradient tensor `w` (shape [params // 256, 256])
    replicates: int = 1
    probes: int = 64
    units: int = 4096  # ReLU units of the one activation layer
    n_test: int = 1000
    n_train: int = 500
    classes: int = 4

    def logical_bytes(self) -> dict[str, int]:
        """Uncompressed bytes of the big arrays, by path."""
        grad = self.rows * self.replicates * self.params * 4
        return {
            **{f"grad/w/{kind}": grad for kind in ("sum", "sumsq", "pos", "neg")},
            "acts/l0/bits": self.rows * self.probes * (self.units // 8),
            "preds/test": self.rows * self.replicates * self.n_test * 2,
            "preds/train": self.rows * self.replicates * self.n_train * 2,
        }


def _tiled(rng: np.random.Generator, shape: tuple[int, ...], shift: int, dtype: str, high: int) -> np.ndarray:
    base = rng.integers(0, high, PATTERN).astype(dtype)
    flat = np.resize(np.roll(base, shift), int(np.prod(shape)))
    return flat.reshape(shape)


def write_store(path: Path, size: Size, seed: int = 0) -> Path:
    """Write a complete store of `size` at `path` (one row per writer put) and cache its linear reference."""
    rng = np.random.default_rng(seed)
    m, k = size.replicates, size.classes
    shape = (size.params // 256, 256)
    layers = {"l0": {"units": size.units, "shape": [size.units], "module": "l0"}}
    streams = [
        schema.grad_stream(size.rows, m, {"w": shape}),
        schema.acts_stream(size.rows, size.probes, layers, False),
        schema.preds_stream(size.rows, m, {"test": size.n_test, "train": size.n_train}, False),
    ]
    static = schema.data_arrays(
        train_index=np.arange(m * size.n_train).reshape(m, size.n_train),
        test_index=np.arange(size.n_test),
        labels_train=rng.integers(0, k, (m, size.n_train)),
        labels_test=rng.integers(0, k, size.n_test),
        noise_mask=np.zeros((m, size.n_train), dtype=bool),
    )
    attrs = {"steps_per_epoch": 1, "config": {}, "replicates": m, "num_classes": k, "loss": "cross_entropy"}
    writer = create_store(path, attrs, streams, static)
    writer.start()
    n = 64
    for g in range(size.rows):
        step = np.array([g], np.int64)
        sums = _tiled(rng, (1, m, *shape), g, "float32", 100) - 50
        writer.put(
            RowBlock(
                "grad",
                g,
                {
                    "grad/step": step,
                    "grad/n": np.full((1, m), n, np.int64),
                    "grad/loss_sum": np.ones((1, m)),
                    "grad/w/sum": sums,
                    "grad/w/sumsq": sums * sums / n + _tiled(rng, (1, m, *shape), g, "float32", 30),
                    "grad/w/pos": _tiled(rng, (1, m, *shape), g, "int32", n // 2),
                    "grad/w/neg": _tiled(rng, (1, m, *shape), g, "int32", n // 2),
                },
            )
        )
        bits = _tiled(rng, (1, size.probes, size.units // 8), g, "uint8", 256)
        writer.put(RowBlock("acts", g, {"acts/step": step, "acts/epoch": step.astype(np.int32), "acts/l0/bits": bits}))
        preds = {
            "preds/step": step,
            "preds/test": _tiled(rng, (1, m, size.n_test), g, "int16", k),
            "preds/train": _tiled(rng, (1, m, size.n_train), g, "int16", k),
        }
        writer.put(RowBlock("preds", g, preds))
    writer.close("complete")
    reference = {
        "train": rng.integers(0, k, (m, size.n_train)),
        "test": rng.integers(0, k, (m, size.n_test)),
    }
    assert mi_references.write_cache(StoreReader(path), "linear", [-1] * m, reference)
    return path
