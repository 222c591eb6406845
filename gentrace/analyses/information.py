"""Plug-in information of discrete variables from joint histograms, and I(F_t;Y) of stored predictions.

The estimators of Nakkiran et al. 2019 (shared/papers/sgd-increasing-complexity-mutual-information.txt,
section 2.1, Definition 1, footnote 7) that both the `mi` analysis (gentrace.analyses.mi) and its
reference classifiers (gentrace.analyses.mi_references, which needs T0 to fit `fit-linear`) use;
the estimator and its bias are described in gentrace.analyses.mi.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

from gentrace.core.errors import AnalysisInputError
from gentrace.store import schema
from gentrace.store.reader import StoreReader

Split = Literal["test", "train"]
SPLITS: tuple[str, ...] = get_args(Split)


# -- plug-in information from histograms ---------------------------------------------------------
def entropy_bits(counts: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Plug-in entropy in bits of the histogram `counts` summed over every axis not in `axes`.

    Args:
        counts: [Q, *bins] float64 joint counts (or probabilities) per row q.
        axes: the bin axes (1-based, after Q) of the variables whose joint entropy is wanted.

    Returns:
        [Q] float64: -sum p log2 p with p the normalized marginal histogram of those variables.
    """
    drop = tuple(a for a in range(1, counts.ndim) if a not in axes)
    marginal = counts.sum(axis=drop) if drop else counts
    flat = marginal.reshape(len(marginal), -1)
    p = flat / flat.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=1)


def joint_counts(codes: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Joint histogram [Q, k, ..., k] float64 of discrete variables per row, by one bincount.

    Args:
        codes: each [Q, n] or [n] (broadcast over Q) integer values in 0..k-1.
        k: number of values of every variable (the number of classes).
    """
    arrays = [np.asarray(c, dtype=np.int64) for c in codes]
    q = max((a.shape[0] for a in arrays if a.ndim == 2), default=1)
    n = arrays[0].shape[-1]
    combined = np.broadcast_to(np.arange(q, dtype=np.int64)[:, None], (q, n)).copy()
    for a in arrays:
        if a.size and (a.min() < 0 or a.max() >= k):
            raise AnalysisInputError(f"mi: class values must lie in 0..{k - 1}, found {a.min()}..{a.max()}")
        combined *= k
        combined += a  # broadcasts a [n] label vector over the Q rows
    size = q * k ** len(arrays)
    return np.bincount(combined.ravel(), minlength=size).astype(np.float64).reshape(q, *([k] * len(arrays)))


def mutual_information(counts: np.ndarray) -> np.ndarray:
    """I(A;B) in bits per row of a joint histogram counts [Q, K_a, K_b]."""
    return entropy_bits(counts, (1,)) + entropy_bits(counts, (2,)) - entropy_bits(counts, (1, 2))


def information(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every quantity of the module docstring from joint histograms counts [Q, K_f, K_y, K_l] (axes F, Y, L).

    Returns:
        mi_fy, mi_fy_given_l, mi_ly_given_f, mi_ly, mu, acc-free: each [Q] float64 bits.
    """
    h_f, h_y, h_l = (entropy_bits(counts, (a,)) for a in (1, 2, 3))
    h_fy, h_fl, h_yl = entropy_bits(counts, (1, 2)), entropy_bits(counts, (1, 3)), entropy_bits(counts, (2, 3))
    h_fyl = entropy_bits(counts, (1, 2, 3))
    mi_fy = h_f + h_y - h_fy
    mi_fy_given_l = h_fl + h_yl - h_fyl - h_l
    return {
        "mi_fy": mi_fy,
        "mu": mi_fy - mi_fy_given_l,
        "mi_fy_given_l": mi_fy_given_l,
        "mi_ly_given_f": h_fl + h_fy - h_fyl - h_f,
        "mi_ly": h_l + h_y - h_yl,
    }


# -- the null model (footnote 7) -----------------------------------------------------------------
def null_channel(p: float, k: int) -> np.ndarray:
    """P(L~ = l | Y = y) [K_y, K_l] of the null model: Y with probability p, uniformly random otherwise."""
    return p * np.eye(k) + (1.0 - p) / k


def null_information(label_counts: np.ndarray, p: float) -> float:
    """I(L~;Y) in bits for labels with histogram label_counts [K] and the null model with parameter p."""
    k = len(label_counts)
    joint = label_counts[:, None] * null_channel(p, k)
    return float(mutual_information(joint[None])[0])


def null_p(label_counts: np.ndarray, target_bits: float, tol: float = 1e-12) -> float:
    """The p in [0, 1] with I(L~;Y) = target_bits (bisection: I(L~;Y) increases with p from 0 to H(Y))."""
    low, high = 0.0, 1.0
    if target_bits >= null_information(label_counts, 1.0):
        return 1.0
    if target_bits <= 0:
        return 0.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if null_information(label_counts, mid) < target_bits:
            low = mid
        else:
            high = mid
        if high - low < tol:
            break
    return 0.5 * (low + high)


def null_counts(fy_counts: np.ndarray, p: float) -> np.ndarray:
    """Expected joint counts [Q, K, K, K] of (F, Y, L~) from counts of (F, Y) [Q, K, K] (L~ given Y only)."""
    k = fy_counts.shape[-1]
    return fy_counts[..., None] * null_channel(p, k)[None, None]


# -- T0 and the stored predictions -----------------------------------------------------------
def first_reaching(mi_fy: np.ndarray, mi_ly: float) -> int | None:
    """Index of T0: the first row with I(F_t;Y) >= I(L;Y), or None if training never gets there."""
    hits = np.flatnonzero(np.asarray(mi_fy) >= mi_ly)
    return int(hits[0]) if hits.size else None


def check_classification(reader: StoreReader) -> int:
    """The store's number of classes K; AnalysisInputError for a regression store."""
    reader.require(schema.PREDS)
    k = int(reader.attrs.get("num_classes", 0) or 0)
    if reader.attrs.get("loss") == "mse" or k < 2:
        raise AnalysisInputError(
            f"{reader.path}: mi needs class predictions, but this run is a regression "
            f"(loss {reader.attrs.get('loss')!r}); mutual information of predicted classes does not apply"
        )
    return k


# Prediction values per task: joint_counts holds ~4 int64 temporaries per value, so ~64 MiB at this size.
BLOCK_VALUES = 2**21


class ReplicateRows:
    """Lazy [Q, n] view of replicate m in a [Q, M, n] zarr array: `view[a:b]` reads rows a..b-1 only."""

    def __init__(self, array: Any, m: int) -> None:
        self.array, self.m = array, m

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.array[rows, self.m])


def mi_fy_by_step(reader: StoreReader, split: Split, m: int, labels: np.ndarray, rows: int, k: int) -> np.ndarray:
    """I(F_t;Y) [rows] of replicate m on `split` at the first `rows` recorded steps, reading row blocks."""
    array = reader.lazy(schema.PREDS.split(split))
    step = max(1, BLOCK_VALUES // max(1, int(array.shape[-1])))
    parts = [
        mutual_information(joint_counts([np.asarray(array[a : min(rows, a + step), m]), labels], k))
        for a in range(0, rows, step)
    ]
    return np.concatenate(parts) if parts else np.empty(0)
