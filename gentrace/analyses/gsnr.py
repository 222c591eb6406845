"""Gradient signal-to-noise ratio (GSNR) and same-sign fraction of per-sample gradients.

Liu et al., "Understanding why neural networks generalize well through GSNR of parameters"
(ICLR 2020; shared/papers/gsnr-osgr-generalization.txt). From the stored moments of one replicate
at one recorded step, over its n samples and for each parameter q (SPEC section 5):

    k_q     = sum_q / n                  mean gradient (section 2.3, eq. 4)
    rho_q^2 = sumsq_q / n - k_q^2        per-sample variance (section 2.1, population form)
    r_q     = k_q^2 / rho_q^2            GSNR, estimated as in section 3.1, eq. 23 (eq. 1 in the limit)
    same_sign_q = max(pos_q, neg_q) / (pos_q + neg_q)     p_same_sign of section 3.1, Figure 2c

Numerics. The store keeps `sum` and `sumsq` as float32, so rho_q^2 is a difference of two rounded
numbers: identical per-sample gradients give rounding noise of about 2**-23 * sumsq_q / n instead of
0 (negative as often as positive). Everything is computed in float64, and rho_q^2 <= ZERO_VARIANCE_RTOL
* sumsq_q / n (8 * 2**-23, about 1e-6, relative to the second moment) counts as zero variance: such a
parameter is left out of the GSNR statistics and counted in `zero_variance`. A consequence is that
GSNR values above about 1 / ZERO_VARIANCE_RTOL (~1e6) cannot be told apart from zero variance in
float32 moments. A parameter whose samples all have a zero gradient (pos_q + neg_q = 0) is left out of
`same_sign`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import pandas as pd

from gentrace.analyses import plan as chunks
from gentrace.core.errors import AnalysisInputError, StoreError
from gentrace.store import schema
from gentrace.store.reader import StoreReader

By = Literal["model", "layer", "param"]
BY: tuple[str, ...] = get_args(By)

# Relative tolerance on rho^2 / (sumsq / n): float32 rounding of sum and sumsq leaves at most ~3 * 2**-24
# of the second moment as noise in rho^2; 8 * 2**-23 gives a margin of five.
ZERO_VARIANCE_RTOL = 8 * 2.0**-23

KINDS = schema.GRAD.MOMENTS
COLUMNS: dict[str, list[str]] = {
    "model": ["step", "epoch", "replicate", "gsnr_mean", "gsnr_median", "same_sign", "n", "zero_variance"],
    "layer": ["step", "epoch", "replicate", "layer", "gsnr_mean", "gsnr_median", "same_sign", "n", "zero_variance"],
    "param": ["step", "epoch", "replicate", "layer", "index", "gsnr", "same_sign", "grad_mean", "grad_var", "n"],
}


def moments(
    sum_g: np.ndarray, sumsq_g: np.ndarray, n: np.ndarray, rtol: float = ZERO_VARIANCE_RTOL
) -> tuple[np.ndarray, np.ndarray]:
    """Mean gradient k and per-sample variance rho^2, in float64 (section 2.3, eq. 4 and 8).

    Args:
        sum_g: [..., *shape] sum over samples of the per-sample gradient (float32 in the store).
        sumsq_g: [..., *shape] sum over samples of its square.
        n: [...] samples; broadcast over the trailing tensor axes.
        rtol: rho^2 <= rtol * sumsq / n is float32 rounding noise and is set to exactly 0.

    Returns:
        k, rho2: [..., *shape] float64; rho2 >= 0 everywhere.
    """
    n64 = np.asarray(n, dtype=np.float64)
    n64 = n64.reshape(n64.shape + (1,) * (np.ndim(sum_g) - n64.ndim))
    k = np.asarray(sum_g, dtype=np.float64) / n64
    second = np.asarray(sumsq_g, dtype=np.float64) / n64
    rho2 = second - k * k
    rho2[rho2 <= rtol * second] = 0.0  # also clips the small negatives rounding leaves
    return k, rho2


def same_sign(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """max(pos, neg) / (pos + neg) per parameter, NaN where no sample has a non-zero gradient."""
    pos64, neg64 = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    total = pos64 + neg64
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.maximum(pos64, neg64) / total, np.nan)


def compute(
    sum_g: Mapping[str, np.ndarray],
    sumsq_g: Mapping[str, np.ndarray],
    pos_g: Mapping[str, np.ndarray],
    neg_g: Mapping[str, np.ndarray],
    n: np.ndarray,
    step: np.ndarray,
    epoch: np.ndarray,
    *,
    by: By = "model",
    replicates: Sequence[int] | None = None,
    rtol: float = ZERO_VARIANCE_RTOL,
) -> pd.DataFrame:
    """GSNR statistics of recorded gradient moments (pure: arrays in, DataFrame out).

    Args:
        sum_g: tensor name -> [G, M, *shape] float32, sum over samples of the per-sample gradient.
        sumsq_g: tensor name -> [G, M, *shape] float32, sum of squares.
        pos_g: tensor name -> [G, M, *shape] int32, samples with a positive gradient.
        neg_g: tensor name -> [G, M, *shape] int32, samples with a negative gradient.
        n: [G, M] samples per replicate.
        step: [G] optimizer step of each row.
        epoch: [G] completed epochs at each row.
        by: `model` (one row per step and replicate, over every parameter), `layer` (one more
            level: per tensor) or `param` (one row per parameter).
        replicates: the replicate number of each index along M (default 0..M-1).
        rtol: relative zero-variance tolerance, see the module docstring.

    Returns:
        by=model: step, epoch, replicate, gsnr_mean, gsnr_median, same_sign, n, zero_variance.
        by=layer: the same with `layer` (the tensor name) after `replicate`.
        by=param: step, epoch, replicate, layer, index (flat index in the tensor), gsnr (NaN for
        zero variance), same_sign (NaN with no non-zero gradient), grad_mean (k_q), grad_var
        (rho_q^2, 0 within the tolerance), n.
    """
    if by not in BY:
        raise AnalysisInputError(f"gsnr: by must be one of {', '.join(BY)}, not {by!r}")
    n = np.asarray(n)
    labels = list(range(n.shape[1])) if replicates is None else list(replicates)
    frames: list[pd.DataFrame] = []
    for g in range(len(step)):
        for m, label in enumerate(labels):
            tensors = ((t, [(sum_g[t][g, m], sumsq_g[t][g, m], pos_g[t][g, m], neg_g[t][g, m])]) for t in sum_g)
            frames.append(replicate_frame(tensors, int(n[g, m]), int(step[g]), int(epoch[g]), label, by, rtol))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in COLUMNS[by]})
    return pd.concat(frames, ignore_index=True)


Block = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def replicate_frame(
    tensors: Iterable[tuple[str, Iterable[Block]]],
    n: int,
    step: int,
    epoch: int,
    replicate: int,
    by: str,
    rtol: float = ZERO_VARIANCE_RTOL,
) -> pd.DataFrame:
    """Rows of one replicate at one step, from each tensor's moments given block by block.

    Args:
        tensors: (name, blocks) per tensor; each block is (sum, sumsq, pos, neg) of any shape, and the
            raveled blocks of a tensor, concatenated, are its raveled moments (`plan.row_blocks`).
        n: samples of this replicate at this step.
        step: the `step` column.
        epoch: the `epoch` column.
        replicate: the `replicate` column.
        by: model | layer | param.
        rtol: relative zero-variance tolerance.

    Memory: one block, plus (by model or layer) r_q and same_sign_q of every parameter of the
    group, 16 bytes each: the median needs them all.
    """
    if n <= 0:
        raise AnalysisInputError(f"gsnr: replicate {replicate} has n = {n} samples at step {step}")
    key = {"step": step, "epoch": epoch, "replicate": replicate}
    param_frames: list[pd.DataFrame] = []
    rows: list[dict[str, object]] = []
    model: tuple[list[np.ndarray], list[np.ndarray], list[int]] = ([], [], [])
    for name, parts in tensors:
        r_parts, signed_parts, zero, offset = [], [], 0, 0
        for s, ss, pos, neg in parts:
            k, rho2 = moments(np.ravel(s), np.ravel(ss), np.asarray(n), rtol)
            same = same_sign(np.ravel(pos), np.ravel(neg))
            if by == "param":
                param_frames.append(_param_frame(key, name, offset, k, rho2, same, n))
            else:
                varies = rho2 > 0
                r_parts.append(k[varies] ** 2 / rho2[varies])
                signed_parts.append(same[~np.isnan(same)])
                zero += int(varies.size - np.count_nonzero(varies))
            offset += k.size
        if by == "layer":
            rows.append({**key, "layer": name, **_stats(_cat(r_parts), _cat(signed_parts), zero, n)})
        model[0].extend(r_parts)
        model[1].extend(signed_parts)
        model[2].append(zero)
    if by == "param":
        return pd.concat(param_frames, ignore_index=True)
    if by == "model":
        rows = [{**key, **_stats(_cat(model[0]), _cat(model[1]), sum(model[2]), n)}]
    return pd.DataFrame(rows, columns=COLUMNS[by]).astype({c: _dtype(c) for c in COLUMNS[by]})


def _param_frame(
    key: dict[str, int], name: str, offset: int, k: np.ndarray, rho2: np.ndarray, same: np.ndarray, n: int
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            **key,
            "layer": name,
            "index": np.arange(offset, offset + k.size, dtype=np.int64),
            "gsnr": _ratio(k, rho2),
            "same_sign": same,
            "grad_mean": k,
            "grad_var": rho2,
            "n": n,
        }
    )


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0)


def _ratio(k: np.ndarray, rho2: np.ndarray) -> np.ndarray:
    """r_q = k_q^2 / rho_q^2, NaN where rho_q^2 = 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rho2 > 0, k * k / rho2, np.nan)


def _stats(r: np.ndarray, signed: np.ndarray, zero_variance: int, n: int) -> dict[str, float | int]:
    """Summary of a group: r [q] GSNR of its parameters with rho^2 > 0, signed [q'] defined same_sign values."""
    return {
        "gsnr_mean": float(r.mean()) if r.size else np.nan,
        "gsnr_median": float(np.median(r)) if r.size else np.nan,
        "same_sign": float(signed.mean()) if signed.size else np.nan,
        "n": n,
        "zero_variance": zero_variance,
    }


def _dtype(column: str) -> str:
    if column in ("step", "epoch", "replicate", "n", "zero_variance", "index"):
        return "int64"
    return "str" if column == "layer" else "float64"


def epochs_of(reader: StoreReader, steps: np.ndarray) -> np.ndarray:
    """Completed epochs at each step: step // the store's steps_per_epoch."""
    per_epoch = reader.attrs.get("steps_per_epoch")
    if not isinstance(per_epoch, int) or per_epoch <= 0:
        raise StoreError(f"{reader.path} has no valid steps_per_epoch attribute; the store is damaged")
    return np.asarray(steps, dtype=np.int64) // per_epoch


def replicate_selection(reader: StoreReader, replicate: int | None, replicates: int) -> tuple[slice, list[int]]:
    """The slice along M to read and the replicate number of each index in it."""
    if replicate is None:
        return slice(None), list(range(replicates))
    if not 0 <= replicate < replicates:
        raise AnalysisInputError(
            f"{reader.path} has replicates 0..{replicates - 1}; replicate {replicate} does not exist"
        )
    return slice(replicate, replicate + 1), [replicate]


def plan(
    reader: StoreReader,
    by: By = "model",
    replicate: int | None = None,
    *,
    rtol: float = ZERO_VARIANCE_RTOL,
    block_bytes: int = chunks.BLOCK_BYTES,
) -> chunks.Plan:
    """One task per recorded step and replicate (step-major, as `compute` orders its rows).

    Each task reads its row of each moment array tensor by tensor, in blocks of about `block_bytes`
    along the tensor's first axis (`chunks.row_blocks`): memory stays bounded by a block plus 16
    bytes per parameter of one replicate at one step, whatever the number of recorded steps.
    """
    if by not in BY:
        raise AnalysisInputError(f"gsnr: by must be one of {', '.join(BY)}, not {by!r}")
    reader.require(schema.GRAD)
    steps = reader.array(schema.GRAD.step)
    rows = len(steps)  # read once: a live run may commit more rows while this runs
    epochs = epochs_of(reader, steps)
    n_all = np.asarray(reader.lazy(schema.GRAD.n)[:rows])
    select, labels = replicate_selection(reader, replicate, n_all.shape[1])
    indices = range(n_all.shape[1])[select]
    path = str(reader.path.resolve())  # absolute: a worker started elsewhere opens the same store
    tasks = [
        chunks.Task(
            _row_task, (path, g, m, label, int(steps[g]), int(epochs[g]), int(n_all[g, m]), by, rtol, block_bytes)
        )
        for g in range(rows)
        for m, label in zip(indices, labels, strict=True)
    ]
    return chunks.Plan(tasks)


def _row_task(
    path: str, g: int, m: int, label: int, step: int, epoch: int, n: int, by: str, rtol: float, block_bytes: int
) -> pd.DataFrame:
    """The frame of replicate m at row g, read from the store at `path` block by block."""
    reader = StoreReader(path)
    arrays = {t: [reader.lazy(schema.GRAD.moment(t, kind)) for kind in KINDS] for t in reader.grad_tensor_names()}
    tensors = ((t, chunks.row_blocks(a, g, m, block_bytes)) for t, a in arrays.items())
    return replicate_frame(tensors, n, step, epoch, label, by, rtol)  # type: ignore[arg-type]


def frames(
    reader: StoreReader, by: By = "model", replicate: int | None = None, *, rtol: float = ZERO_VARIANCE_RTOL
) -> Iterator[pd.DataFrame]:
    """`compute` one recorded step and replicate at a time, reading in blocks: memory stays bounded."""
    return chunks.local(plan(reader, by, replicate, rtol=rtol))


def run(
    reader: StoreReader, by: By = "model", replicate: int | None = None, *, rtol: float = ZERO_VARIANCE_RTOL
) -> pd.DataFrame:
    """GSNR statistics of every recorded step of a store (SPEC section 5, `gentrace analyze gsnr`).

    Args:
        reader: an opened store with gradient moments (`record.grad_moments`).
        by: model | layer | param, see `compute`.
        replicate: one replicate's rows only; None for every replicate.
        rtol: relative zero-variance tolerance, see the module docstring.

    Raises:
        MissingStreamError: the run recorded no gradient moments.
        AnalysisInputError: `replicate` out of range.
    """
    return pd.concat(list(frames(reader, by, replicate, rtol=rtol)), ignore_index=True)
