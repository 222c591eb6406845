"""Mutual information of predictions and labels, and performance correlation with a simpler classifier.

Nakkiran et al., "SGD on neural networks learns functions of increasing complexity" (NeurIPS 2019;
shared/papers/sgd-increasing-complexity-mutual-information.txt). From the stored predicted classes
F_t of the network at each recorded step, the labels Y and the predictions L of a reference
classifier on the same samples (SPEC section 5, `mi`), all in bits:

    I(F;Y)   = H(F) + H(Y) - H(F,Y)                           section 2.1
    I(F;Y|L) = H(F,L) + H(Y,L) - H(F,Y,L) - H(L)              section 2.1
    I(L;Y|F) = H(L,F) + H(Y,F) - H(F,Y,L) - H(F)
    mu       = mu_Y(F;L) = I(F;Y) - I(F;Y|L) = I(L;Y) - I(L;Y|F)   Definition 1 (chain rule, footnote 3)
    T0       = the first recorded step with I(F_t;Y) >= I(L;Y)   section 3, "Results and Discussion"

Estimator. Entropies are plug-in (maximum-likelihood) entropies of the empirical joint histogram of
the n samples of a split: H = -sum_c (c/n) log2(c/n). The histogram of (F_t, Y, L) for every recorded
step at once is one `np.bincount` over the combined code ((q*K + f)*K + y)*K + l, so all steps and
columns cost one pass over Q x n int16 values. Because every quantity comes from the same joint
histogram, the chain-rule identity above holds exactly (to rounding), not only in expectation.

Plug-in bias. The plug-in MI of two independent variables with K_a and K_b values is not 0 but
positive, about (K_a - 1)(K_b - 1) / (2 n ln 2) bits (Miller-Madow); for binary F, Y and n = 10,000
test samples that is ~7e-5 bits, for 10 classes ~6e-3 bits. The conditional MI carries the bias of
each L-slice. No bias correction is applied: it is small against the signals of the paper (0.1-0.9
bits) at these n.

Splits. `--split test` (default) uses the test set as the population, as the paper does; `mi_fy_train`
is always I(F_t;Y_S) on the replicate's own training samples (section 2.1), NaN when the train split
was not recorded. `acc` is P[F_t = Y] on the chosen split.

Null model (footnote 7). L~(X) = Y with probability p and a uniformly random class otherwise, with p
in [0, 1] set by bisection so that I(L~;Y) = I(L;Y) under the split's empirical label distribution.
Instead of drawing one random L~, the joint of (F_t, Y, L~) is the exact expectation
P(f, y) * P(l | y) with P(l | y) = p [l = y] + (1 - p) / K: the null ratio then carries no sampling
noise (a single draw would add plug-in noise of the size above).

References (the `L`) are computed by gentrace.analyses.mi_references and cached in the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import pandas as pd

from gentrace.analyses import plan as chunks
from gentrace.analyses.gsnr import epochs_of
from gentrace.analyses.information import (
    BLOCK_VALUES,
    SPLITS,
    ReplicateRows,
    Split,
    check_classification,
    first_reaching,
    information,
    joint_counts,
    mutual_information,
    null_counts,
    null_p,
)
from gentrace.core.errors import AnalysisInputError, MissingStreamError
from gentrace.store import schema
from gentrace.store.reader import StoreReader

COLUMNS = ["step", "epoch", "acc", "mi_fy", "mi_fy_train", "mu", "mi_fy_given_l", "mi_ly_given_f", "mi_ly"]
SUMMARY_COLUMNS = [
    "reference",
    "t0_step",
    "t0_epoch",
    "mi_ly",
    "mi_fy_t0",
    "mu_t0",
    "ratio",
    "null_p",
    "mu_null_t0",
    "ratio_null",
]


# -- the analysis --------------------------------------------------------------------------------
def compute(
    preds: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray | None,
    step: np.ndarray,
    epoch: np.ndarray,
    num_classes: int,
    *,
    preds_train: np.ndarray | None = None,
    labels_train: np.ndarray | None = None,
    null: float | None = None,
) -> pd.DataFrame:
    """The `mi` columns of one replicate at every recorded step (pure: arrays in, DataFrame out).

    Args:
        preds: [Q, n] predicted classes F_t on the chosen split.
        labels: [n] labels Y of that split.
        reference: [n] reference predictions L on the same samples; None with `null`.
        step: [Q] optimizer steps.
        epoch: [Q] completed epochs.
        num_classes: K; every class value lies in 0..K-1.
        preds_train: [Q, n_s] predictions on the replicate's training samples (for mi_fy_train).
        labels_train: [n_s] their labels Y_S.
        null: instead of `reference`, the null model L~ with this p (expected joint, footnote 7).

    Returns:
        One row per step with COLUMNS (bits; acc = P[F_t = Y]).
    """
    preds = np.asarray(preds)
    if reference is not None:
        counts = joint_counts([preds, labels, reference], num_classes)
    elif null is not None:
        counts = null_counts(joint_counts([preds, labels], num_classes), null)
    else:
        raise AnalysisInputError("mi: give reference predictions or a null-model p")
    info = information(counts)
    if preds_train is not None and labels_train is not None:
        mi_train = mutual_information(joint_counts([preds_train, labels_train], num_classes))
    else:
        mi_train = np.full(len(preds), np.nan)
    acc = (preds == np.asarray(labels)[None]).mean(axis=1) if preds.shape[1] else np.full(len(preds), np.nan)
    return pd.DataFrame(
        {
            "step": np.asarray(step, dtype=np.int64),
            "epoch": np.asarray(epoch, dtype=np.int64),
            "acc": acc.astype(np.float64),
            "mi_fy": info["mi_fy"],
            "mi_fy_train": mi_train,
            "mu": info["mu"],
            "mi_fy_given_l": info["mi_fy_given_l"],
            "mi_ly_given_f": info["mi_ly_given_f"],
            "mi_ly": info["mi_ly"],
        },
        columns=COLUMNS,
    )


def summarize(
    table: pd.DataFrame, preds: np.ndarray, labels: np.ndarray, num_classes: int, reference_name: str
) -> dict[str, object]:
    """The summary of one replicate: mu(F_T0;L)/I(F_T0;Y) for the reference and for its null model.

    Args:
        table: `compute`'s rows for this replicate.
        preds: [Q, n] the same predictions: an array, or a lazy view whose [t0 : t0 + 1] reads one row.
        labels: [n] the labels.
        num_classes: K.
        reference_name: written into the `reference` column.

    Returns:
        SUMMARY_COLUMNS; t0 and the ratios are NaN when I(F_t;Y) never reaches I(L;Y).
    """
    mi_ly = float(table["mi_ly"].iloc[0]) if len(table) else float("nan")
    label_counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    p = null_p(label_counts, mi_ly) if np.isfinite(mi_ly) else float("nan")
    t0 = first_reaching(table["mi_fy"].to_numpy(), mi_ly) if len(table) else None
    row: dict[str, object] = {"reference": reference_name, "mi_ly": mi_ly, "null_p": p}
    if t0 is None:
        nan = float("nan")
        row.update(t0_step=-1, t0_epoch=-1, mi_fy_t0=nan, mu_t0=nan, ratio=nan, mu_null_t0=nan, ratio_null=nan)
        return row
    fy = joint_counts([np.asarray(preds[t0 : t0 + 1]), labels], num_classes)  # only row T0 is read
    mu_null = float(information(null_counts(fy, p))["mu"][0])
    mi_fy = float(table["mi_fy"].iloc[t0])
    mu = float(table["mu"].iloc[t0])
    row.update(
        t0_step=int(table["step"].iloc[t0]),
        t0_epoch=int(table["epoch"].iloc[t0]),
        mi_fy_t0=mi_fy,
        mu_t0=mu,
        ratio=mu / mi_fy if mi_fy > 0 else float("nan"),
        mu_null_t0=mu_null,
        ratio_null=mu_null / mi_fy if mi_fy > 0 else float("nan"),
    )
    return row


def plan(
    reader: StoreReader,
    reference: str = "linear",
    split: Split = "test",
    *,
    summary: bool = False,
    cache: bool = True,
    parts: int = 1,
) -> chunks.Plan:
    """Tasks of `run`: one per replicate and block of recorded steps (replicate-major, as `run` orders rows).

    Each task reads its block of `preds/<split>` (and `preds/train`) rows, at most about BLOCK_VALUES
    values, so memory stays bounded by a block whatever the number of recorded steps; at least
    `parts` blocks per replicate (for a cluster). The reference predictions [M, n] are fitted (or read
    from the cache) here, once; `--summary` reads one more row per replicate, at T0.
    """
    from gentrace.analyses import mi_references

    if split not in SPLITS:
        raise AnalysisInputError(f"mi: split must be one of {', '.join(SPLITS)}, not {split!r}")
    k = check_classification(reader)
    if schema.PREDS.split(split) not in reader.streams()[schema.PREDS.name]:
        raise MissingStreamError(
            f"{reader.path}: this run has no {split} predictions; record them with record.predictions.splits"
        )
    q = len(reader.array(schema.PREDS.step))  # read once: a live run may commit more rows meanwhile
    array = reader.lazy(schema.PREDS.split(split))  # [Q, M, n]
    replicates, n = int(array.shape[1]), int(array.shape[2])
    if reference not in (*mi_references.REFERENCES, "null"):
        choices = ", ".join((*mi_references.REFERENCES, "null"))
        raise AnalysisInputError(f"mi: reference must be one of {choices}, not {reference!r}")
    fitted = "linear" if reference == "null" else reference
    ref_preds = mi_references.reference_predictions(reader, fitted, split, cache=cache)  # [M, n]
    path = str(reader.path.resolve())  # absolute: a worker started elsewhere opens the same store
    ranges = chunks.row_ranges(q, max(1, BLOCK_VALUES // max(1, n)), parts)
    tasks: list[chunks.Task] = []
    labels_of: list[np.ndarray] = []
    for m in range(replicates):
        y = _labels(reader, split, m)
        labels_of.append(y)
        p = None
        if reference == "null":
            y_counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=k).astype(np.float64)
            p = null_p(y_counts, float(mutual_information(joint_counts([ref_preds[m], y], k))[0]))
        ref = None if p is not None else np.asarray(ref_preds[m], dtype=np.int16)
        label = m if replicates > 1 and not summary else None
        tasks.extend(chunks.Task(_block_task, (path, split, m, a, b, ref, p, k, label)) for a, b in ranges)
    if not summary:
        return chunks.Plan(tasks)
    finish = partial(_summaries, path, split, labels_of, k, reference, len(ranges))
    return chunks.Plan(tasks, finish)


def _labels(reader: StoreReader, split: str, m: int) -> np.ndarray:
    """Y of replicate m on `split`: the shared test labels, or its own training labels."""
    if split == "test":
        return reader.array(schema.DATA.labels_test)
    return np.asarray(reader.lazy(schema.DATA.labels_train)[m])


def _block_task(
    path: str,
    split: str,
    m: int,
    a: int,
    b: int,
    reference: np.ndarray | None,
    null: float | None,
    k: int,
    label: int | None,
) -> pd.DataFrame:
    """`compute` on prediction rows a..b-1 of replicate m, read from the store at `path`."""
    reader = StoreReader(path)
    steps = np.asarray(reader.lazy(schema.PREDS.step)[a:b])
    has_train = schema.PREDS.split("train") in reader.streams()[schema.PREDS.name]
    table = compute(
        np.asarray(reader.lazy(schema.PREDS.split(split))[a:b, m]),
        _labels(reader, split, m),
        reference,
        steps,
        epochs_of(reader, steps),
        k,
        preds_train=np.asarray(reader.lazy(schema.PREDS.split("train"))[a:b, m]) if has_train else None,
        labels_train=np.asarray(reader.lazy(schema.DATA.labels_train)[m]),
        null=null,
    )
    if label is not None:
        table.insert(0, "replicate", label)
    return table


def _summaries(
    path: str,
    split: str,
    labels_of: list[np.ndarray],
    k: int,
    reference: str,
    per_replicate: int,
    frames: Iterator[pd.DataFrame],
) -> Iterator[pd.DataFrame]:
    """--summary: gather each replicate's per-step rows (per_replicate task frames), summarize them."""
    array = StoreReader(path).lazy(schema.PREDS.split(split))
    rows = []
    for m, y in enumerate(labels_of):
        table = pd.concat([next(frames) for _ in range(per_replicate)], ignore_index=True)
        rows.append({"replicate": m, **summarize(table, ReplicateRows(array, m), y, k, reference)})  # type: ignore[arg-type]
    out = pd.DataFrame(rows, columns=["replicate", *SUMMARY_COLUMNS])
    yield out if len(labels_of) > 1 else out.drop(columns="replicate")


def frames(
    reader: StoreReader,
    reference: str = "linear",
    split: Split = "test",
    *,
    summary: bool = False,
    cache: bool = True,
) -> Iterator[pd.DataFrame]:
    """`run` one block of recorded steps at a time (see `plan`)."""
    return chunks.local(plan(reader, reference, split, summary=summary, cache=cache))


def run(
    reader: StoreReader,
    reference: str = "linear",
    split: Split = "test",
    *,
    summary: bool = False,
    cache: bool = True,
) -> pd.DataFrame:
    """The `mi` table of a store (SPEC section 5, `gentrace analyze mi`).

    Args:
        reader: an opened store with class predictions (`record.predictions`).
        reference: linear | fit-linear | null | cnn2 | cnn4 | cnn6 (see mi_references). `null` is the
            null model matched to the `linear` reference's I(L;Y) (footnote 7).
        split: the split standing for the population (test, as in the paper, or train).
        summary: one row per replicate with T0 and the ratios (SUMMARY_COLUMNS) instead of per-step rows.
        cache: store computed references in the store's `derived/mi` group when it is writable.

    Returns:
        COLUMNS per recorded step (with a `replicate` column first when the run has M > 1 replicates),
        or the summary.

    Raises:
        MissingStreamError: no predictions (or not of `split`).
        AnalysisInputError: a regression store, an unknown reference or split.
    """
    return pd.concat(list(frames(reader, reference, split, summary=summary, cache=cache)), ignore_index=True)
