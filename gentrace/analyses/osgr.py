"""One-step generalization ratio (OSGR): both sides of eq. 17, and eq. 20 written with the GSNR.

Liu et al., "Understanding why neural networks generalize well through GSNR of parameters"
(ICLR 2020; shared/papers/gsnr-osgr-generalization.txt), section 2.4. M replicates start from one
initialization and train on disjoint training sets of n samples each; all share one test set. At
a recorded step t, with k_qm and rho_qm^2 the mean gradient and per-sample variance of parameter q
of replicate m (`gsnr.moments`, float64, same zero-variance tolerance):

    E(k_q^2) ~ Ek2_q = mean_m k_qm^2,   rho_q^2 ~ rho2_q = mean_m rho_qm^2          (eq. 22)
    osgr_rhs          = 1 - sum_q rho2_q / (n * sum_q Ek2_q)                        (eq. 17)
    osgr_rhs_weighted = 1 - (1/n) sum_q W_q / (r_q + 1/n)                           (eq. 20)
        W_q = Ek2_q / sum_q' Ek2_q'   (the share of the training-loss decrease, eq. 20 with lambda -> 0)
        r_q = Ek2_q / rho2_q          (the GSNR estimate of section 3.1, eq. 23, pooled over replicates
                                       by eq. 22; a parameter with rho2_q = 0 has r_q = inf: no term)
    osgr_lhs          = sum_m (L'_{t+1,m} - L'_{t,m}) / sum_m (L_{t+1,m} - L_{t,m})   (eq. 21)

with L and L' the mean training and test losses of the `metrics` stream at steps t and t+1.

Why r_q = Ek2_q / rho2_q. The exact GSNR of eq. 1 is mu_q^2 / rho_q^2 with mu_q^2 = E(k_q^2) - rho_q^2 / n
(the line after eq. 19); with that estimate eq. 20 is eq. 17 rewritten (eq. 18-19) and the column
would repeat `osgr_rhs` to the last digit. With eq. 23's r_q (E(k^2) ~ mu^2 for large n), which is
what `analyze gsnr` reports, eq. 20 gives 1 - (1/n) sum_q W_q rho2_q / (Ek2_q + rho2_q / n): it differs
from eq. 17 only by that O(1/n) term, and shows how much of the ratio the measured GSNR explains.

Step convention: row t of `grad` and of `metrics` both describe the parameters after t optimizer
updates (before update t + 1); the update that uses k(theta_t) moves the losses from row t to row
t + 1. The left side needs a metrics row at t and at t + 1 (`record.eval_every_steps = 1`); eq. 17
is derived for full-batch gradient descent with a small learning rate (`train.batch_size = 0`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from gentrace.analyses import plan as chunks
from gentrace.analyses.gsnr import ZERO_VARIANCE_RTOL, epochs_of, moments
from gentrace.core.errors import AnalysisInputError
from gentrace.core.varying import cell, flatten, varying_keys
from gentrace.store import schema
from gentrace.store.reader import StoreReader

COLUMNS = ["step", "epoch", "osgr_lhs", "osgr_rhs", "osgr_rhs_weighted", "n"]
ACROSS_COLUMNS = [*COLUMNS, "pearson_r_across", "pearson_r_weighted_across", "n_points"]
SUMMARY_COLUMNS = [
    "pearson_r",
    "pearson_r_weighted",
    "n_steps",
    "osgr_lhs_mean",
    "osgr_rhs_mean",
    "osgr_rhs_weighted_mean",
]


def rhs(
    sum_g: Mapping[str, np.ndarray],
    sumsq_g: Mapping[str, np.ndarray],
    n: np.ndarray,
    *,
    rtol: float = ZERO_VARIANCE_RTOL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-hand sides of eq. 17 (with eq. 22) and of eq. 20 at every recorded step.

    Args:
        sum_g: tensor name -> [G, M, *shape] sum over samples of the per-sample gradient.
        sumsq_g: tensor name -> [G, M, *shape] sum of squares.
        n: [G, M] samples per replicate; the M values of a row must be equal (eq. 17 has one n).
        rtol: relative zero-variance tolerance (see `gentrace.analyses.gsnr`).

    Returns:
        osgr_rhs [G], osgr_rhs_weighted [G] float64 (NaN where every k_qm is 0), n [G] int64.
    """
    return rhs_blocks(lambda g: ((sum_g[name][g], sumsq_g[name][g]) for name in sum_g), n, rtol=rtol)


def rhs_blocks(
    blocks_of: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
    n: np.ndarray,
    *,
    rtol: float = ZERO_VARIANCE_RTOL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`rhs` with the moments of row g given as (sum, sumsq) blocks [M, ...] by `blocks_of(g)` (see `row_sums`)."""
    n = np.asarray(n)
    if n.ndim != 2 or n.shape[1] < 2:
        raise AnalysisInputError(f"osgr needs M >= 2 replicates (n has shape {n.shape}); set train.replicates")
    unequal = np.flatnonzero((n != n[:, :1]).any(axis=1))
    if unequal.size:
        raise AnalysisInputError(
            f"osgr needs the same number of samples in every replicate; row {unequal[0]} has n = {n[unequal[0]]}"
        )
    rows = n.shape[0]
    n_row = n[:, 0].astype(np.int64)
    sums = np.zeros((rows, 3))
    for g in range(rows):
        if n_row[g] <= 0:
            raise AnalysisInputError(f"osgr: row {g} has n = {n_row[g]} samples")
        sums[g] = row_sums(blocks_of(g), n[g], rtol)
    ek2_sum, rho2_sum, weighted_sum = sums.T
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(ek2_sum > 0, 1.0 / (n_row * ek2_sum), np.nan)
    return 1.0 - rho2_sum * scale, 1.0 - weighted_sum * scale, n_row


def row_sums(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]], n: np.ndarray, rtol: float = ZERO_VARIANCE_RTOL
) -> tuple[float, float, float]:
    """The three sums over q of one recorded step, accumulated block by block.

    Args:
        blocks: (sum, sumsq) pairs [M, ...] covering every parameter once (whole tensors, or blocks
            of them along their first axis as `plan.row_blocks` reads them).
        n: [M] samples per replicate (all equal).
        rtol: relative zero-variance tolerance.

    Returns:
        sum_q Ek2_q, sum_q rho2_q, and sum_q Ek2_q rho2_q / (Ek2_q + rho2_q / n) (= sum_q S W_q / (r_q + 1/n)).
    """
    ek2_sum = rho2_sum = weighted_sum = 0.0
    n_one = int(np.asarray(n).ravel()[0])
    for s, ss in blocks:
        k, rho2 = moments(s, ss, n, rtol)  # [M, ...]
        ek2, rho2_mean = (k * k).mean(axis=0), rho2.mean(axis=0)  # eq. 22
        ek2_sum += ek2.sum()
        rho2_sum += rho2_mean.sum()
        denominator = ek2 + rho2_mean / n_one
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(denominator > 0, ek2 * rho2_mean / denominator, 0.0)
        weighted_sum += terms.sum()
    return float(ek2_sum), float(rho2_sum), float(weighted_sum)


def lhs(step: np.ndarray, metric_step: np.ndarray, train_loss: np.ndarray, test_loss: np.ndarray) -> np.ndarray:
    """Left-hand side, eq. 21, at each step t of `step`; NaN without metrics rows at t and t + 1.

    Args:
        step: [G] recorded gradient steps t.
        metric_step: [R] steps of the metrics rows.
        train_loss: [R, M] mean training loss L of each replicate.
        test_loss: [R, M] mean test loss L' of each replicate.

    Returns:
        [G] float64: sum_m (L'_{t+1,m} - L'_{t,m}) / sum_m (L_{t+1,m} - L_{t,m}); NaN also where the
        training loss did not change.
    """
    row_of = {int(s): i for i, s in enumerate(np.asarray(metric_step))}
    train = np.asarray(train_loss, dtype=np.float64)
    test = np.asarray(test_loss, dtype=np.float64)
    out = np.full(len(step), np.nan)
    for g, t in enumerate(np.asarray(step)):
        now, after = row_of.get(int(t)), row_of.get(int(t) + 1)
        if now is None or after is None:
            continue
        d_train = float((train[after] - train[now]).sum())
        if d_train != 0.0:
            out[g] = float((test[after] - test[now]).sum()) / d_train
    return out


def compute(
    sum_g: Mapping[str, np.ndarray],
    sumsq_g: Mapping[str, np.ndarray],
    n: np.ndarray,
    step: np.ndarray,
    epoch: np.ndarray,
    metric_step: np.ndarray,
    train_loss: np.ndarray,
    test_loss: np.ndarray,
    *,
    rtol: float = ZERO_VARIANCE_RTOL,
) -> pd.DataFrame:
    """Both sides of eq. 17 and eq. 20 at every recorded step (pure: arrays in, DataFrame out).

    Args:
        sum_g: tensor name -> [G, M, *shape] sum over samples of the per-sample gradient.
        sumsq_g: tensor name -> [G, M, *shape] sum of squares.
        n: [G, M] samples per replicate.
        step: [G] optimizer step of each gradient row.
        epoch: [G] completed epochs at each gradient row.
        metric_step: [R] steps of the `metrics` rows.
        train_loss: [R, M] mean training loss of each replicate.
        test_loss: [R, M] mean test loss of each replicate.
        rtol: relative zero-variance tolerance.

    Returns:
        Columns step, epoch, osgr_lhs, osgr_rhs, osgr_rhs_weighted, n (samples per replicate).
    """
    osgr_rhs, osgr_rhs_weighted, n_row = rhs(sum_g, sumsq_g, n, rtol=rtol)
    return _frame(step, epoch, lhs(step, metric_step, train_loss, test_loss), osgr_rhs, osgr_rhs_weighted, n_row)


def _frame(
    step: np.ndarray,
    epoch: np.ndarray,
    osgr_lhs: np.ndarray,
    osgr_rhs: np.ndarray,
    osgr_rhs_weighted: np.ndarray,
    n: np.ndarray,
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": np.asarray(step, dtype=np.int64),
            "epoch": np.asarray(epoch, dtype=np.int64),
            "osgr_lhs": np.asarray(osgr_lhs, dtype=np.float64),
            "osgr_rhs": np.asarray(osgr_rhs, dtype=np.float64),
            "osgr_rhs_weighted": np.asarray(osgr_rhs_weighted, dtype=np.float64),
            "n": np.asarray(n, dtype=np.int64),
        },
        columns=COLUMNS,
    )


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two series over the entries where both are finite; NaN below 2 or if constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def summarize(per_step: pd.DataFrame) -> pd.DataFrame:
    """One row summarizing per-step OSGR rows: how well the two sides of eq. 17 agree (the paper's Figure 1).

    Columns: pearson_r (osgr_lhs with osgr_rhs), pearson_r_weighted (osgr_lhs with osgr_rhs_weighted),
    n_steps (steps where osgr_lhs and osgr_rhs are both finite), and osgr_lhs_mean, osgr_rhs_mean,
    osgr_rhs_weighted_mean over those steps.
    """
    both = per_step[np.isfinite(per_step["osgr_lhs"]) & np.isfinite(per_step["osgr_rhs"])]
    row = {
        "pearson_r": pearson(both["osgr_lhs"].to_numpy(), both["osgr_rhs"].to_numpy()),
        "pearson_r_weighted": pearson(both["osgr_lhs"].to_numpy(), both["osgr_rhs_weighted"].to_numpy()),
        "n_steps": len(both),
        "osgr_lhs_mean": float(both["osgr_lhs"].mean()) if len(both) else np.nan,
        "osgr_rhs_mean": float(both["osgr_rhs"].mean()) if len(both) else np.nan,
        "osgr_rhs_weighted_mean": float(both["osgr_rhs_weighted"].mean()) if len(both) else np.nan,
    }
    return pd.DataFrame([row], columns=SUMMARY_COLUMNS).astype({"n_steps": "int64"})


def run(
    reader: StoreReader,
    summary: bool = False,
    step: int | None = None,
    *,
    rtol: float = ZERO_VARIANCE_RTOL,
) -> pd.DataFrame:
    """OSGR of every recorded gradient step of a store (SPEC section 5, `gentrace analyze osgr`).

    Reads the gradient moments one row of one tensor at a time, in blocks along the tensor's first axis
    (memory bounded by a block of M replicates), and the small metrics arrays whole.

    Args:
        reader: an opened store with gradient moments, M >= 2 replicates and per-step metrics.
        summary: return only the one-row `summarize` of the per-step rows (over the store's steps; the
            paper's comparison across settings is `across`, over several stores).
        step: keep only the row of this recorded step (not with `summary`).
        rtol: relative zero-variance tolerance (see `gentrace.analyses.gsnr`).

    Raises:
        MissingStreamError: no gradient moments or no metrics.
        AnalysisInputError: fewer than 2 replicates, unequal n, no step with metrics at t and t + 1, or
            `step` is not a recorded gradient step.
    """
    if summary and step is not None:
        raise AnalysisInputError(
            f"{reader.path}: --step with --summary compares several stores at one step (give a sweep directory); "
            "the summary of one store is over all its steps: drop --step or --summary"
        )
    per_step = _per_step(reader, rtol)
    if step is not None:
        return at_step([per_step], step, [str(reader.path)]).loc[:, COLUMNS]
    return summarize(per_step) if summary else per_step


def _per_step(reader: StoreReader, rtol: float) -> pd.DataFrame:
    reader.require(schema.GRAD)
    steps = reader.array(schema.GRAD.step)
    rows = len(steps)
    n_all = np.asarray(reader.lazy(schema.GRAD.n)[:rows])
    if n_all.shape[1] < 2:
        raise AnalysisInputError(
            f"{reader.path} has {n_all.shape[1]} replicate; OSGR (eq. 21-22) compares M >= 2 models trained "
            "from one initialization on disjoint sets: set train.replicates (e.g. --set train.replicates=4)"
        )
    reader.require(schema.METRICS)
    metric_step = reader.array(schema.METRICS.step)
    rows_m = len(metric_step)
    train_loss = np.asarray(reader.lazy(schema.METRICS.split_loss("train"))[:rows_m])
    test_loss = np.asarray(reader.lazy(schema.METRICS.split_loss("test"))[:rows_m])
    osgr_lhs = lhs(steps, metric_step, train_loss, test_loss)
    if not np.isfinite(osgr_lhs).any():
        raise AnalysisInputError(
            f"{reader.path}: no gradient step t has train/test losses at both t and t + 1, which the left side "
            "of eq. 17 needs; record them with record.eval_every_steps = 1"
        )
    tensors = reader.grad_tensor_names()
    arrays = [[reader.lazy(schema.GRAD.moment(t, m)) for m in schema.GRAD.FLOAT_MOMENTS] for t in tensors]
    osgr_rhs, osgr_rhs_weighted, n_row = rhs_blocks(
        lambda g: (block for a in arrays for block in chunks.row_blocks(a, g, slice(None))),  # type: ignore[misc]
        n_all,
        rtol=rtol,
    )
    return _frame(steps, epochs_of(reader, steps), osgr_lhs, osgr_rhs, osgr_rhs_weighted, n_row)


# -- across settings: the paper's Figure 1 -------------------------------------------------------------
def common_steps(per_step: Sequence[pd.DataFrame]) -> list[int]:
    """The recorded steps at which every table has both sides of eq. 17 finite, increasing."""
    sets = [
        set(frame["step"][np.isfinite(frame["osgr_lhs"]) & np.isfinite(frame["osgr_rhs"])].tolist())
        for frame in per_step
    ]
    return sorted(set.intersection(*sets)) if sets else []


def at_step(per_step: Sequence[pd.DataFrame], step: int | None = None, names: Sequence[str] = ()) -> pd.DataFrame:
    """One row per setting at one step, and the Pearson r across the settings (Figure 1, section 3.1).

    The paper's Figure 1 puts one point per setting (training-set size, width) at a given epoch and
    correlates lhs with rhs over those points; r over the steps of one run is a different quantity.

    Args:
        per_step: one `compute`/`run` table per setting (columns COLUMNS).
        step: the step compared [default: the first step where every setting has both sides finite].
        names: a name per table for the error messages (e.g. its store path).

    Returns:
        ACROSS_COLUMNS, one row per table in order; pearson_r_across (lhs with rhs over the rows),
        pearson_r_weighted_across (lhs with osgr_rhs_weighted) and n_points repeat on every row (NaN
        below 2 points).

    Raises:
        AnalysisInputError: no step is common to every table, or `step` is not one of the common steps.
    """
    common = common_steps(per_step)
    if step is None:
        if not common:
            raise AnalysisInputError(
                "osgr: no recorded step has both sides of eq. 17 in every store; record the same "
                "record.grad_moments cadence with record.eval_every_steps = 1 in each"
            )
        step = common[0]
    rows = []
    for i, frame in enumerate(per_step):
        row = frame[frame["step"] == step]
        if row.empty:
            name = names[i] if i < len(names) else f"table {i}"
            shown = ", ".join(map(str, common[:8])) + (", ..." if len(common) > 8 else "")
            raise AnalysisInputError(
                f"{name} has no gradient row at step {step}; give --step one of the recorded steps: {shown or 'none'}"
            )
        rows.append(row.iloc[:1])
    table = pd.concat(rows, ignore_index=True).loc[:, COLUMNS]
    lhs_, rhs_, weighted = (table[c].to_numpy() for c in ("osgr_lhs", "osgr_rhs", "osgr_rhs_weighted"))
    finite = np.isfinite(lhs_) & np.isfinite(rhs_)
    table["pearson_r_across"] = pearson(lhs_, rhs_)
    table["pearson_r_weighted_across"] = pearson(lhs_, weighted)
    table["n_points"] = np.int64(finite.sum())
    return table.loc[:, ACROSS_COLUMNS]


def across(
    readers: Sequence[StoreReader],
    summary: bool = False,
    step: int | None = None,
    *,
    rtol: float = ZERO_VARIANCE_RTOL,
) -> pd.DataFrame | None:
    """`analyze osgr --summary` of several stores (a sweep): `at_step` with the stores' labels in front.

    Columns `store` and one per config key that differs between the stores (as for any analysis of
    several stores), then ACROSS_COLUMNS. None without `summary`: the per-step rows of each store are
    then the table (gentrace.training.sweep.over_stores).
    """
    if not summary:
        return None
    per_step = [_per_step(reader, rtol) for reader in readers]
    table = at_step(per_step, step, [str(reader.path) for reader in readers])
    trees = [reader.config for reader in readers]
    front = {"store": [str(reader.path) for reader in readers]}
    for key in varying_keys(trees):
        front[key] = [cell(flatten(tree).get(key)) for tree in trees]
    return pd.concat([pd.DataFrame(front), table], axis=1)
