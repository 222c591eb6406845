"""ReLU path similarity of probe samples over training: overlap, cross, self, rank, ratio (SPEC section 5).

"Image functions" paper (shared/papers/image-functions-path-overlap.txt): each image i at each
epoch t follows its own path p_i^t in {0,1}^units, the on/off pattern of a layer's ReLU units
(section 5, the path function p_i^t). From the store's `acts/<layer>/bits` [A, P, bytes], with
|p| = sqrt(count of ones) and `*` the elementwise product (AND of 0/1 vectors):

    overlap  (p_i^t . p_j^t) / (|p_i^t| |p_j^t|)                                   section 6.4, Figure 4
    cross    ((p_i^t * p_j^t) . (p_i^s * p_j^s)) / (|p_i^t * p_j^t| |p_i^s * p_j^s|)  section 6.1, Figures 1-3
    self     (p_i^t . p_i^s) / (|p_i^t| |p_i^s|)                                    section 7.1, Figure 5
    rank     for each base j, the rank of every other probe by overlap with j         section 8, Figure 6
    ratio    mean cross over the epochs before the first lr decay / over the second stage   Figure 7

where s is the previous *recorded* epoch (t - 1 when activations are recorded every epoch). Every
quantity comes from three integer kernels of `gentrace.analyses.bits`: with G^t = P^t P^t^T the
Gram matrix of the paths at t (a blocked matrix product) and c_i^t = |p_i^t|^2 = G^t_ii,

    overlap_ij = G^t_ij / sqrt(c_i^t c_j^t)
    cross_ij   = G^q_ij / sqrt(G^t_ij G^s_ij),    q_i = p_i^t AND p_i^s
    self_i     = popcount(p_i^t AND p_i^s) / sqrt(c_i^t c_i^s)

because (p_i^t * p_j^t) . (p_i^s * p_j^s) = sum_u p_i^t p_i^s p_j^t p_j^s = q_i . q_j, and for a 0/1
vector |p_i^t * p_j^t|^2 = p_i^t . p_j^t = G^t_ij: cross needs one new Gram matrix per epoch (G^q)
besides G^t, which overlap computes anyway, and G^s, kept from the previous epoch.

Empty paths. A sample with no active unit has |p| = 0 and every similarity with it is 0/0. Such
values are undefined, never NaN in the output: they are left out of the statistics and of
`--pairs`, and counted in `empty`, which counts
    overlap, rank  samples whose path at t is empty (their pairs are left out: n = C(P - empty, 2));
    cross          pairs i < j whose product path p_i^t * p_j^t or p_i^s * p_j^s is empty (n + empty = C(P, 2));
    self           samples whose path at t or at s is empty (n + empty = P).
A pair with non-empty product paths that share no unit has cross = 0 (defined). Statistics of a
group with n = 0 are empty fields (NaN): there is nothing to summarize.

Outputs, one group per layer (in forward order) and recorded epoch: the default summary has the
columns epoch, layer, kind, mean, q10, q50, q90 (quantiles with linear interpolation), n, empty over
unordered pairs i < j (samples for self); cross and self start at the second recorded epoch.
`pairs=True` gives every defined pair: epoch, layer, kind, i, j, value (i, j are probe positions:
row i of `acts/<layer>/bits`, training sample data/probe_index[i]). rank and ratio have their own
columns, see `rank_frames` and `ratio`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Literal, get_args

import numpy as np
import pandas as pd

from gentrace.analyses import bits
from gentrace.analyses import plan as chunks
from gentrace.core.errors import AnalysisInputError, MissingStreamError, StoreError
from gentrace.store import schema
from gentrace.store.reader import StoreReader

Kind = Literal["overlap", "cross", "self", "rank", "ratio"]
KINDS: tuple[str, ...] = get_args(Kind)
COLUMNS = ["epoch", "layer", "kind", "mean", "q10", "q50", "q90", "n", "empty"]
PAIR_COLUMNS = ["epoch", "layer", "kind", "i", "j", "value"]
RANK_COLUMNS = ["epoch", "layer", "kind", "base", "neighbours", "changed", "sym_diff", "changes", "n", "empty"]
RANK_PAIR_COLUMNS = ["epoch", "layer", "kind", "base", "other", "overlap", "rank"]
RATIO_COLUMNS = ["layer", "kind", "decay_epoch", "early_epochs", "mid_epochs", "early_mean", "mid_mean", "ratio"]
NEAREST = 6  # the paper's Figure 6 follows the nearest 6 neighbours of a base image
NO_DECAY = "this run has no learning-rate decay; set train.lr_decay.every_epochs"


# -- similarities of one layer (pure: packed bits in, float64 values and a defined-mask out) ---------------
def cosine(dot: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalized dot product: dot / sqrt(sq_a sq_b) where both squared norms are > 0, else 0 and undefined.

    Args:
        dot: [...] integer dot products of 0/1 vectors.
        sq_a: [...] squared norms (counts of ones) of the left vectors, broadcast against `dot`.
        sq_b: [...] squared norms of the right vectors.

    Returns:
        value [...] float64 (0 where undefined), defined [...] bool.
    """
    # float64 products of integer counts are exact below 2**53
    norms = np.broadcast_to(np.asarray(sq_a, dtype=np.float64) * np.asarray(sq_b, dtype=np.float64), np.shape(dot))
    defined = norms > 0
    value = np.zeros(np.shape(dot), dtype=np.float64)
    value[defined] = np.asarray(dot, dtype=np.float64)[defined] / np.sqrt(norms[defined])
    return value, defined


def overlap(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Overlap of every pair from the Gram matrix G^t [P, P] of the paths at t: [P, P] values, defined."""
    counts = np.diag(gram)
    return cosine(gram, counts[:, None], counts[None, :])


def cross(gram_q: np.ndarray, gram_t: np.ndarray, gram_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cross similarity of every pair (section 6.1): G^q / sqrt(G^t G^s), each [P, P]; q = p^t AND p^s."""
    return cosine(gram_q, gram_t, gram_s)


def self_similarity(bits_t: np.ndarray, bits_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Self similarity of each sample (section 7.1): [P, bytes] at t and at s -> [P] values, defined."""
    return cosine(bits.dot_rows(bits_t, bits_s), bits.popcount(bits_t), bits.popcount(bits_s))


def upper_pairs(value: np.ndarray, defined: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The defined entries above the diagonal of [P, P] matrices: i [n], j [n], value [n] (row-major order)."""
    i, j = np.triu_indices(value.shape[0], k=1)
    keep = defined[i, j]
    return i[keep], j[keep], value[i, j][keep]


# -- per-layer frames ---------------------------------------------------------------------------------------
def summary(epoch: int, layer: str, kind: str, values: np.ndarray, empty: int) -> pd.DataFrame:
    """One row: mean, q10, q50, q90 and n of the defined `values`, with the `empty` count."""
    values = np.asarray(values, dtype=np.float64)
    stats = [values.mean(), *np.quantile(values, [0.1, 0.5, 0.9])] if values.size else [np.nan] * 4
    row = [epoch, layer, kind, *map(float, stats), int(values.size), int(empty)]
    return pd.DataFrame([row], columns=COLUMNS).astype({"epoch": "int64", "n": "int64", "empty": "int64"})


def pair_frame(epoch: int, layer: str, kind: str, i: np.ndarray, j: np.ndarray, value: np.ndarray) -> pd.DataFrame:
    """Every defined pair (or sample, j = i, for self) of one layer at one epoch."""
    return pd.DataFrame(
        {
            "epoch": np.full(len(i), epoch, dtype=np.int64),
            "layer": layer,
            "kind": kind,
            "i": np.asarray(i, dtype=np.int64),
            "j": np.asarray(j, dtype=np.int64),
            "value": np.asarray(value, dtype=np.float64),
        },
        columns=PAIR_COLUMNS,
    )


def layer_frames(
    layer: str,
    epochs: Sequence[int],
    rows: Iterable[np.ndarray],
    kind: Kind = "overlap",
    *,
    pairs: bool = False,
    device: str | None = None,
) -> Iterator[pd.DataFrame]:
    """overlap, cross or self of one layer, one frame per recorded epoch (pure: bit rows in).

    Args:
        layer: the layer name written into the `layer` column.
        epochs: [A] recorded epochs, increasing.
        rows: A packed bit matrices [P, bytes] (acts/<layer>/bits row by row): one epoch is held at a time.
        kind: overlap | cross | self.
        pairs: every defined pair instead of the summary.
        device: where the Gram matrices are computed (see `bits.pairwise_dot`).
    """
    if kind not in ("overlap", "cross", "self"):
        raise AnalysisInputError(f"layer_frames computes overlap, cross or self, not {kind!r}")
    prev_bits: np.ndarray | None = None  # paths at s, the previous recorded epoch
    prev_gram: np.ndarray | None = None  # G^s (cross)
    for epoch, row in zip(epochs, rows, strict=False):
        now, t = np.asarray(row, dtype=np.uint8), int(epoch)
        if kind == "overlap":
            gram = bits.pairwise_dot(now, device=device)
            i, j, v = upper_pairs(*overlap(gram))
            empty = int(np.count_nonzero(np.diag(gram) == 0))
        elif kind == "cross":
            gram = bits.pairwise_dot(now, device=device)
            if prev_bits is not None and prev_gram is not None:
                gram_q = bits.pairwise_dot(bits.and_bits(now, prev_bits), device=device)
                i, j, v = upper_pairs(*cross(gram_q, gram, prev_gram))
                empty = len(now) * (len(now) - 1) // 2 - len(v)
            prev_gram = gram
        elif prev_bits is not None:
            value, defined = self_similarity(now, prev_bits)
            i = j = np.flatnonzero(defined)
            v, empty = value[i], len(now) - len(i)
        first = prev_bits is None
        prev_bits = now
        if kind != "overlap" and first:
            continue  # cross and self compare with the previous recorded epoch
        yield pair_frame(t, layer, kind, i, j, v) if pairs else summary(t, layer, kind, v, empty)


def nearest(value: np.ndarray, defined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank of every other probe by overlap with each base (section 8): rank 0 = the nearest neighbour.

    Candidates of base j are the probes i != j with a defined overlap (both paths non-empty);
    they are ordered by decreasing float64 overlap, equal values by increasing index i.

    Args:
        value: [P, P] symmetric overlap.
        defined: [P, P] bool, where the overlap is defined.

    Returns:
        order [P, P] int64 (row j: candidates of base j first, nearest first, then the others);
        n [P] int64: candidates per base (rank r < n[j] is valid).
    """
    candidate = defined & ~np.eye(len(value), dtype=bool)
    key = np.where(candidate, -value, np.inf)  # non-candidates last
    order = np.argsort(key, axis=1, kind="stable")  # stable: ties keep index order
    return order, candidate.sum(axis=1)


def rank_frames(
    layer: str,
    epochs: Sequence[int],
    rows: Iterable[np.ndarray],
    *,
    pairs: bool = False,
    bases: Sequence[int] | None = None,
    k: int = NEAREST,
    device: str | None = None,
) -> Iterator[pd.DataFrame]:
    """Nearest neighbours by overlap of each base sample over epochs (section 8, Figure 6): one frame per epoch.

    Summary columns: epoch, layer, kind ("rank"), base, neighbours (the k nearest probe positions in
    rank order, space-separated; fewer when fewer candidates, none for a base with an empty path),
    changed (1 when the *set* of the k nearest differs from the one at the previous recorded epoch,
    0 at the first), sym_diff (size of the symmetric difference of the two sets), changes (changed
    summed over the epochs so far: how often the identity of the nearest k changed), n (candidates
    ranked), empty (probes whose path at this epoch is empty; they are nobody's neighbour, and a
    base with an empty path has no neighbours: its set is empty, so becoming empty is a change).
    `pairs`: epoch, layer, kind, base, other, overlap, rank for every base and candidate.

    Args:
        layer: the layer name written into the `layer` column.
        epochs: [A] recorded epochs, increasing.
        rows: A packed bit matrices [P, bytes], one per epoch.
        pairs: every (base, other) pair instead of the per-base summary.
        bases: probe positions to report (all by default); the ranking always uses every probe.
        k: size of the nearest set compared between epochs.
        device: where the Gram matrices are computed (see `bits.pairwise_dot`).
    """
    prev_sets: np.ndarray | None = None
    changes: np.ndarray | None = None
    for epoch, row in zip(epochs, rows, strict=False):
        now = np.asarray(row, dtype=np.uint8)
        p = len(now)
        gram = bits.pairwise_dot(now, device=device)
        value, defined = overlap(gram)
        order, n = nearest(value, defined)
        rank_pos = np.arange(p)[None, :]
        sets = np.zeros((p, p), dtype=bool)  # sets[j, i]: i is among the k nearest of j
        top = rank_pos < np.minimum(n, k)[:, None]
        np.put_along_axis(sets, order, top, axis=1)
        changed = np.zeros(p, dtype=np.int64) if prev_sets is None else (sets != prev_sets).any(axis=1).astype(np.int64)
        sym_diff = np.zeros(p, dtype=np.int64) if prev_sets is None else (sets != prev_sets).sum(axis=1)
        changes = changed.copy() if changes is None else changes + changed
        prev_sets = sets
        chosen = np.arange(p) if bases is None else np.asarray(bases, dtype=np.int64)
        if pairs:
            yield _rank_pairs(int(epoch), layer, value, order, n, chosen)
            continue
        empty = int(np.count_nonzero(np.diag(gram) == 0))
        neighbours = [" ".join(map(str, order[j, : min(k, n[j])])) for j in chosen]
        yield pd.DataFrame(
            {
                "epoch": np.full(len(chosen), int(epoch), dtype=np.int64),
                "layer": layer,
                "kind": "rank",
                "base": chosen,
                "neighbours": neighbours,
                "changed": changed[chosen],
                "sym_diff": sym_diff[chosen],
                "changes": changes[chosen],
                "n": n[chosen].astype(np.int64),
                "empty": np.full(len(chosen), empty, dtype=np.int64),
            },
            columns=RANK_COLUMNS,
        )


def _rank_pairs(
    epoch: int, layer: str, value: np.ndarray, order: np.ndarray, n: np.ndarray, chosen: np.ndarray
) -> pd.DataFrame:
    sub_order, sub_n = order[chosen], n[chosen]
    rank = np.broadcast_to(np.arange(order.shape[1]), sub_order.shape)
    keep = rank < sub_n[:, None]
    base = np.broadcast_to(chosen[:, None], sub_order.shape)[keep]
    other = sub_order[keep]
    return pd.DataFrame(
        {
            "epoch": np.full(len(base), epoch, dtype=np.int64),
            "layer": layer,
            "kind": "rank",
            "base": base.astype(np.int64),
            "other": other.astype(np.int64),
            "overlap": value[base, other],
            "rank": rank[keep].astype(np.int64),
        },
        columns=RANK_PAIR_COLUMNS,
    )


# -- ratio of early to mid cross similarity ------------------------------------------------------------
def lr_by_epoch(step: np.ndarray, lr: np.ndarray, steps_per_epoch: int) -> dict[int, float]:
    """Learning rate of each training epoch seen in the recorded lr [R] at optimizer steps [R].

    The lr recorded at step s > 0 is the one of the update that reached s, which belongs to
    training epoch (s - 1) // steps_per_epoch (epoch e runs from step e * spe to (e + 1) * spe);
    a row at step 0 describes no update and is skipped.
    """
    out: dict[int, float] = {}
    for s, rate in zip(np.asarray(step), np.asarray(lr, dtype=np.float64), strict=True):
        if s > 0 and np.isfinite(rate):
            out.setdefault(int((s - 1) // steps_per_epoch), float(rate))
    return out


def decay_epochs(lrs: dict[int, float]) -> list[int]:
    """Training epochs whose lr is lower than that of the previous epoch with a recorded lr."""
    epochs = sorted(lrs)
    return [e for prev, e in zip(epochs, epochs[1:], strict=False) if lrs[e] < lrs[prev]]


def ratio(layer: str, cross_summary: pd.DataFrame, epochs: Sequence[int], decays: Sequence[int]) -> pd.DataFrame:
    """Early-to-mid cross similarity ratio of one layer (Figure 7): one row, RATIO_COLUMNS.

    The cross value at recorded epoch t compares t with the previous recorded epoch s, across the
    updates of training epochs s .. t - 1. With d1, d2 the first and second decay epochs (d2 = no
    end when there is one decay), "early" (the paper: "average over epochs before first decay")
    takes the epochs t <= d1, whose updates all ran at the initial lr, and "mid" ("averaged over the
    second stage of training") the epochs with s >= d1 and t <= d2, all at the first decayed lr; an
    epoch whose interval straddles a decay belongs to neither. Each side is the mean over its
    epochs of the per-epoch mean cross similarity over pairs ("averaged over training data");
    epochs with no defined pair (n = 0) are skipped.

    Args:
        layer: layer name.
        cross_summary: the layer's cross summary rows (epoch, mean, n, ...).
        epochs: [A] every recorded epoch of the activations, increasing.
        decays: training epochs where the lr drops (`decay_epochs`), increasing.
    """
    if not decays:
        raise AnalysisInputError(NO_DECAY)
    d1, d2 = decays[0], (decays[1] if len(decays) > 1 else np.inf)
    prev_of = {int(t): int(s) for s, t in zip(epochs, epochs[1:], strict=False)}
    rows = cross_summary[cross_summary["n"] > 0]
    early = [m for t, m in zip(rows["epoch"], rows["mean"], strict=True) if t <= d1]
    mid = [m for t, m in zip(rows["epoch"], rows["mean"], strict=True) if prev_of[int(t)] >= d1 and t <= d2]
    if not early or not mid:
        side = "before" if not early else "after"
        raise AnalysisInputError(
            f"layer {layer}: no recorded pair of epochs {side} the first learning-rate decay (epoch {d1}); "
            "record activations on both sides of it (record.activations.every_epochs)"
        )
    early_mean, mid_mean = float(np.mean(early)), float(np.mean(mid))
    if mid_mean == 0.0:
        raise AnalysisInputError(f"layer {layer}: the mean cross similarity after the decay is 0; no ratio")
    row = [layer, "ratio", int(d1), len(early), len(mid), early_mean, mid_mean, early_mean / mid_mean]
    return pd.DataFrame([row], columns=RATIO_COLUMNS).astype(
        {"decay_epoch": "int64", "early_epochs": "int64", "mid_epochs": "int64"}
    )


def recorded_lr(reader: StoreReader) -> dict[int, float]:
    """Training epoch -> lr from `metrics_fine/lr` (every step) or else `metrics/lr`."""
    for stream in (schema.METRICS_FINE, schema.METRICS):
        if reader.has(stream.name) and reader.committed(stream.name) > 0:
            step = reader.array(stream.step)
            lr = np.asarray(reader.lazy(stream.lr)[: len(step)])
            return lr_by_epoch(step, lr, _steps_per_epoch(reader))
    raise MissingStreamError(
        f"{reader.path}: this run has no recorded learning rate; record it with record.eval_every_steps"
    )


def _steps_per_epoch(reader: StoreReader) -> int:
    per_epoch = reader.attrs.get("steps_per_epoch")
    if not isinstance(per_epoch, int) or per_epoch <= 0:
        raise StoreError(f"{reader.path} has no valid steps_per_epoch attribute; the store is damaged")
    return per_epoch


# -- the store -------------------------------------------------------------------------------------------
def layers_of(reader: StoreReader, layer: str = "all") -> list[str]:
    """The call sites to analyze: every one for "all", else `layer` (an AnalysisInputError naming the known ones)."""
    reader.require(schema.ACTS)
    known = reader.act_layers()
    if layer == "all":
        return known
    if layer not in known:
        raise AnalysisInputError(
            f"{reader.path} has no activation bitmasks for layer {layer!r}; layers: {', '.join(known)}"
        )
    return [layer]


def plan(
    reader: StoreReader,
    layer: str = "all",
    kind: Kind = "overlap",
    pairs: bool = False,
    *,
    bases: Sequence[int] | None = None,
    device: str | None = None,
    parts: int = 1,
) -> chunks.Plan:
    """Tasks of `run`: per layer, `parts` blocks of consecutive recorded epochs (rank: the whole layer).

    A task reads its layer's bit rows one epoch at a time (two epochs of bits and Gram matrices in
    memory); cross and self also read the row before the block, whose frame the previous task
    yields. rank carries the nearest sets and the change counts from epoch to epoch: one task per
    layer. ratio gathers each layer's cross summaries into one row (`plan.finish`).
    """
    if kind not in KINDS:
        raise AnalysisInputError(f"paths: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "ratio" and pairs:
        raise AnalysisInputError("paths: --pairs has no rows for kind ratio (one number per layer)")
    names = layers_of(reader, layer)
    epochs = tuple(int(e) for e in reader.array(schema.ACTS.epoch))  # read once: a live run may commit more rows
    decays = decay_epochs(recorded_lr(reader)) if kind == "ratio" else []
    if kind == "ratio" and not decays:
        raise AnalysisInputError(f"{reader.path}: {NO_DECAY}")
    path, chosen = str(reader.path.resolve()), None if bases is None else tuple(int(b) for b in bases)
    per_layer = [(0, len(epochs))] if kind == "rank" else chunks.blocks(len(epochs), parts)
    task_kind = "cross" if kind == "ratio" else kind
    tasks = [
        chunks.Task(_layer_task, (path, name, task_kind, pairs, chosen, device, epochs, a, b))
        for name in names
        for a, b in per_layer
    ]
    if kind != "ratio":
        return chunks.Plan(tasks)
    return chunks.Plan(tasks, partial(_ratios, names, epochs, decays))


def _layer_task(
    path: str,
    name: str,
    kind: str,
    pairs: bool,
    bases: tuple[int, ...] | None,
    device: str | None,
    epochs: tuple[int, ...],
    a: int,
    b: int,
) -> Iterator[pd.DataFrame]:
    """Frames of layer `name` at recorded epochs a..b-1, reading its bit rows one at a time."""
    start = a - 1 if kind in ("cross", "self") and a > 0 else a  # the previous epoch, compared with epoch a
    array = StoreReader(path).lazy(schema.ACTS.bits(name))
    rows = (np.asarray(array[r]) for r in range(start, b))
    if kind == "rank":
        yield from rank_frames(name, epochs[start:b], rows, pairs=pairs, bases=bases, device=device)
    else:
        yield from layer_frames(name, epochs[start:b], rows, kind, pairs=pairs, device=device)  # type: ignore[arg-type]


def _ratios(
    names: list[str], epochs: tuple[int, ...], decays: list[int], frames: Iterator[pd.DataFrame]
) -> Iterator[pd.DataFrame]:
    """For kind ratio: each layer's cross summaries (in any number of frames) -> its one ratio row."""
    by_layer: dict[str, list[pd.DataFrame]] = {name: [] for name in names}
    for frame in frames:
        by_layer[str(frame["layer"].iloc[0])].append(frame)
    for name in names:
        per_epoch = pd.concat(by_layer[name], ignore_index=True) if by_layer[name] else pd.DataFrame(columns=COLUMNS)
        yield ratio(name, per_epoch, epochs, decays)


def frames(
    reader: StoreReader,
    layer: str = "all",
    kind: Kind = "overlap",
    pairs: bool = False,
    *,
    bases: Sequence[int] | None = None,
    device: str | None = None,
) -> Iterator[pd.DataFrame]:
    """`run` one layer and epoch at a time: memory holds two epochs of one layer's bits and Gram matrices."""
    return chunks.local(plan(reader, layer, kind, pairs, bases=bases, device=device))


def run(
    reader: StoreReader,
    layer: str = "all",
    kind: Kind = "overlap",
    pairs: bool = False,
    *,
    bases: Sequence[int] | None = None,
    device: str | None = None,
) -> pd.DataFrame:
    """Path similarity of the probe samples of a store (SPEC section 5, `gentrace analyze paths`).

    Args:
        reader: an opened store with activation bitmasks (`record.activations`).
        layer: a ReLU call site (`acts/<layer>`), or "all" for every one in forward order.
        kind: overlap | cross | self | rank | ratio (see the module docstring).
        pairs: every defined pair instead of per-epoch summaries (not for ratio).
        bases: rank only: the base samples to report.
        device: where the Gram matrices are computed: "cpu", "cuda", ...; None picks a GPU when there is one.

    Raises:
        MissingStreamError: the run recorded no activation bitmasks (or, for ratio, no lr).
        AnalysisInputError: unknown layer or kind; ratio without a learning-rate decay.
    """
    return pd.concat(list(frames(reader, layer, kind, pairs, bases=bases, device=device)), ignore_index=True)
