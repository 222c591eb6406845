"""Length, normalised length, distance from init and step variance of a parameter's trajectory.

Loukas et al., "What training reveals about neural network complexity" (NeurIPS 2021; the BTH
paper, shared/papers/bth-lipschitz-training-dynamics.txt, section 4). For snapshots b_s of one
tensor (flattened to D coordinates) at recorded steps s_0 < s_1 < ... < s_T of one replicate
(SPEC section 5):

    delta_k      = ||b_{s_k} - b_{s_{k-1}}||                          one recorded move
    length       = sum_k delta_k                                      Theorem 1's trajectory length
    normalized_length = sum_k delta_k / (sum_{u in (s_{k-1}, s_k]} lr_u * err_u)
    distance_from_init = ||b_{s_T} - b_{s_0}||                         Corollary 3
    step_variance = sum_d Var_k(b_{s_k, d}) over the last K snapshots  Corollary 2 (population variance)

Alignment of steps. A snapshot at step s holds the parameters after s optimizer updates (step 0 =
initialization). The `metrics_fine` row at step u describes update u, the one that takes the
parameters from step u-1 to step u: `lr` is its learning rate and `batch_error` the mean error of
its batch measured before the update (|f(x) - y| for regression, 1 - p(correct class) otherwise),
which is the err_t of the paper's ||b_{t+1} - b_t|| / (lr_t * err_t). With `params_fine` every step
the denominator is exactly lr_u * err_u of the one update between the snapshots; with coarser
snapshots (`params_fine.every_steps` > 1, or tensors only in `params`) it is the sum of lr_u * err_u
over the updates between them. A move whose denominator is 0 (err = 0) is left out of
normalized_length.

Epochs. `--by epoch` puts a move into the epoch of its last update, (s_k - 1) // steps_per_epoch
(0-based, the epoch in which the update ran); its step_variance is over the snapshots taken after
that epoch's updates. `--by step` reports cumulative values at every snapshot, with `epoch` = completed
epochs, s // steps_per_epoch, as in the other analyses. The default K of step_variance is every
snapshot within the last 10 epochs' worth of steps (s > s_T - 10 * steps_per_epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from gentrace.analyses import plan as chunks
from gentrace.core.errors import AnalysisInputError, MissingStreamError
from gentrace.store import schema
from gentrace.store.reader import StoreReader

By = Literal["replicate", "epoch", "step"]
BY: tuple[str, ...] = get_args(By)
LAST_EPOCHS = 10  # default step_variance window, in epochs

COLUMNS: dict[str, list[str]] = {
    "replicate": [
        "replicate", "param", "source", "steps", "length", "normalized_length", "distance_from_init",
        "step_variance", "last_k",
    ],
    "epoch": [
        "replicate", "param", "source", "epoch", "moves", "length", "normalized_length", "distance_from_init",
        "step_variance",
    ],
    "step": ["replicate", "param", "source", "step", "epoch", "length", "normalized_length", "distance_from_init"],
}  # fmt: skip


class Rows:
    """Snapshots b [S, M, *shape] served one row at a time as [M, D] float64, read in blocks of rows.

    `source` is an array or a lazy zarr array (only its rows `order` are read, a block of about
    BLOCK_BYTES of consecutive stored rows at a time), so memory stays bounded by a block whatever S.
    """

    def __init__(self, source: Any, order: np.ndarray, block_bytes: int = chunks.BLOCK_BYTES) -> None:
        self.source, self.order = source, np.asarray(order, dtype=np.int64)
        self.stored = int(self.order.max()) + 1 if len(self.order) else 0
        per_row = int(np.prod(source.shape[1:], dtype=np.int64)) * 8
        self.block = max(1, block_bytes // max(1, per_row))
        self._start, self._rows = 0, np.empty((0,))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> np.ndarray:
        j = int(self.order[i])
        if not self._start <= j < self._start + len(self._rows):
            self._start = j - j % self.block
            self._rows = np.asarray(self.source[self._start : min(self.stored, self._start + self.block)])
        row = self._rows[j - self._start]
        return row.reshape(row.shape[0], -1).astype(np.float64)


def step_variance(b: Rows, index: Sequence[int]) -> np.ndarray:
    """Population variance over the snapshots `index` of b, summed over coordinates: -> [M].

    Two passes over the rows (mean, then squared deviations), summed row after row as NumPy's
    var(axis=0) does, so no more than two rows are held.
    """
    total: np.ndarray | None = None
    for i in index:
        total = b[i] if total is None else total + b[i]
    assert total is not None
    mean = total / len(index)
    squares: np.ndarray | None = None
    for i in index:
        dev = b[i] - mean
        squares = dev * dev if squares is None else squares + dev * dev
    assert squares is not None
    return (squares / len(index)).sum(axis=-1)


def denominators(steps: np.ndarray, fine_step: np.ndarray, lr: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Sum of lr_u * err_u over the updates u in (s_{k-1}, s_k] of each move.

    Args:
        steps: [S] snapshot steps, increasing.
        fine_step: [F] steps of the metrics_fine rows, increasing.
        lr: [F] learning rate of update u.
        err: [F, M] mean batch error of update u, per replicate.

    Returns:
        [S-1, M] float64.
    """
    weight = lr.astype(np.float64)[:, None] * err.astype(np.float64)
    cum = np.concatenate([np.zeros((1, weight.shape[1])), np.cumsum(weight, axis=0)])  # [F+1, M]
    upto = np.searchsorted(fine_step, steps, side="right")  # rows with step <= s
    return cum[upto[1:]] - cum[upto[:-1]]


def _normalized(delta: np.ndarray, denom: np.ndarray) -> np.ndarray:
    """Divide delta by denom, 0 where denom is 0 (the move is left out of the sum)."""
    out = np.zeros_like(delta)
    np.divide(delta, denom, out=out, where=denom > 0)
    return out


def default_last(steps: np.ndarray, steps_per_epoch: int) -> int:
    """Snapshots within the last LAST_EPOCHS epochs' worth of steps (s > s_T - 10 * steps_per_epoch)."""
    return int((steps > steps[-1] - LAST_EPOCHS * steps_per_epoch).sum())


def compute(
    steps: np.ndarray,
    b: np.ndarray | Rows,
    fine_step: np.ndarray,
    lr: np.ndarray,
    err: np.ndarray,
    steps_per_epoch: int,
    by: str = "replicate",
    last: int | None = None,
) -> pd.DataFrame:
    """Trajectory statistics of one tensor (module docstring) without the param/source columns.

    Args:
        steps: [S] snapshot steps, increasing, S >= 1.
        b: [S, M, *shape] snapshots of the tensor (an array), or `Rows` reading them lazily.
        fine_step: [F] metrics_fine/step.
        lr: [F] metrics_fine/lr.
        err: [F, M] metrics_fine/batch_error.
        steps_per_epoch: optimizer steps per epoch.
        by: "replicate" (one row each), "epoch" (per replicate and epoch), "step" (cumulative).
        last: K of step_variance (the last K snapshots); None = the last 10 epochs' worth.
    """
    if by not in BY:
        raise AnalysisInputError(f"--by must be one of {', '.join(BY)}, not {by!r}")
    if last is not None and last < 1:
        raise AnalysisInputError(f"--last must be at least 1, not {last}")
    rows = b if isinstance(b, Rows) else Rows(b, np.arange(len(steps)))
    first = rows[0]  # [M, D]
    n_rep = first.shape[0]
    delta = np.zeros((len(steps) - 1, n_rep))  # [S-1, M] ||b_k - b_{k-1}||
    dist = np.zeros((len(steps), n_rep))  # [S, M] ||b_k - b_0||
    prev = first
    for k in range(1, len(steps)):
        now = rows[k]
        delta[k - 1] = np.linalg.norm(now - prev, axis=-1)
        dist[k] = np.linalg.norm(now - first, axis=-1)
        prev = now
    norm = _normalized(delta, denominators(steps, fine_step, lr, err))
    replicate = np.arange(n_rep)
    if by == "replicate":
        k = min(last if last is not None else default_last(steps, steps_per_epoch), len(steps))
        return pd.DataFrame(
            {
                "replicate": replicate,
                "steps": np.full(n_rep, int(steps[-1] - steps[0])),
                "length": delta.sum(axis=0),
                "normalized_length": norm.sum(axis=0),
                "distance_from_init": dist[-1],
                "step_variance": step_variance(rows, range(len(steps) - k, len(steps))),
                "last_k": np.full(n_rep, k),
            }
        )
    if by == "step":
        zero = np.zeros((1, n_rep))
        length = np.concatenate([zero, np.cumsum(delta, axis=0)])
        normalized = np.concatenate([zero, np.cumsum(norm, axis=0)])
        s, m = len(steps), n_rep
        return pd.DataFrame(
            {
                "replicate": np.tile(replicate, s),
                "step": np.repeat(steps, m),
                "epoch": np.repeat(steps // steps_per_epoch, m),
                "length": length.ravel(),
                "normalized_length": normalized.ravel(),
                "distance_from_init": dist.ravel(),
            }
        ).sort_values(["replicate", "step"], kind="stable", ignore_index=True)
    move_epoch = (steps[1:] - 1) // steps_per_epoch  # [S-1] the epoch of each move's last update
    records = []
    for e in np.unique(move_epoch):
        in_e = move_epoch == e
        after = np.flatnonzero(in_e) + 1  # snapshots taken after this epoch's updates
        variance = step_variance(rows, [int(i) for i in after])
        for m in range(n_rep):
            records.append(
                {
                    "replicate": m,
                    "epoch": int(e),
                    "moves": int(in_e.sum()),
                    "length": float(delta[in_e, m].sum()),
                    "normalized_length": float(norm[in_e, m].sum()),
                    "distance_from_init": float(dist[after[-1], m]),
                    "step_variance": float(variance[m]),
                }
            )
    frame = pd.DataFrame(records, columns=[c for c in COLUMNS["epoch"] if c not in ("param", "source")])
    return frame.sort_values(["replicate", "epoch"], kind="stable", ignore_index=True)


def choose_tensor(reader: StoreReader, param: str | None) -> tuple[schema.TensorStream, str]:
    """(stream, tensor): `params_fine` when it holds the tensor, else `params` (coarser snapshots).

    Without `param`: the first tensor of `params_fine` (the config's first_layer.bias by default),
    else the first bias in `params`. `first_layer.bias` / `first_layer.weight` name the first such
    tensor in recording order.
    """
    fine_stream, coarse_stream = schema.PARAMS_FINE, schema.PARAMS
    fine = reader.tensor_names(fine_stream.name) if reader.committed(fine_stream.name) else []
    coarse = reader.tensor_names(coarse_stream.name) if reader.committed(coarse_stream.name) else []
    if param is None:
        if fine:
            return fine_stream, fine[0]
        biases = [name for name in coarse if name.endswith("bias")]
        if biases:
            return coarse_stream, biases[0]
        raise MissingStreamError(
            f"{reader.path}: this run has no parameter snapshots of a bias; record them with "
            "record.params_fine.every_steps (or record.params.every_epochs)"
        )
    for stream, names in ((fine_stream, fine), (coarse_stream, coarse)):
        if param in names:
            return stream, param
        # `first_layer.bias` (the config's alias) is the first such tensor in recording order, e.g. `0.bias`.
        alias = [
            name for name in names if param.startswith("first_layer.") and name.endswith(param[len("first_layer") :])
        ]
        if alias:
            return stream, alias[0]
    known = sorted(set(fine) | set(coarse))
    raise AnalysisInputError(
        f"{reader.path}: no snapshots of tensor {param!r}; recorded: {', '.join(known) or 'none'} "
        "(record more with record.params_fine.names)"
    )


def run(reader: StoreReader, param: str | None = None, last: int | None = None, by: str = "replicate") -> pd.DataFrame:
    """Trajectory statistics of one tensor of every replicate (columns COLUMNS[by])."""
    stream, name = choose_tensor(reader, param)
    fine = schema.METRICS_FINE
    if not reader.has(fine.name) or reader.committed(fine.name) == 0:
        raise MissingStreamError(f"{reader.path}: this run has no {fine.what} (per-step lr and batch error)")
    steps = reader.array(stream.step)
    order = np.argsort(steps, kind="stable")
    b = Rows(reader.lazy(stream.tensor(name)), order)  # read in row blocks: a `params` tensor can be large
    frame = compute(
        steps[order],
        b,
        reader.array(fine.step),
        reader.array(fine.lr),
        reader.array(fine.batch_error),
        int(reader.attrs["steps_per_epoch"]),
        by=by,
        last=last,
    )
    frame.insert(1, "param", name)
    frame.insert(2, "source", stream.name)
    return frame[COLUMNS[by]]
