"""Local Lipschitz constants of the recorded networks near and far from the training data.

Loukas et al., "What training reveals about neural network complexity" (NeurIPS 2021;
shared/papers/bth-lipschitz-training-dynamics.txt, section 1.1): a ReLU network is piecewise linear,
so its Lipschitz constant on the linear region that contains x is the norm of its input gradient at x.
For each parameter snapshot (`params` stream row, replicate m; the network rebuilt from the stored
config, or the one given as `model`, loaded with that row by gentrace.analyses.replay, in eval mode) and
each point x (SPEC section 5):

    L(x) = ||d f(x) / d x||_2                 one output (mse, bce): the output itself
    L(x) = ||d f_c(x) / d x||_2,  c = argmax_k f_k(x)   several outputs: the predicted-class logit
    L(x) = ||J_f(x)||_2  (largest singular value of the [K, D] input Jacobian)   with `jacobian=True`

Batching. The network sees a chunk of points at once; in eval mode the points do not interact (BatchNorm
uses its running statistics), so the gradient of sum_i f_{c_i}(x_i) with respect to the chunk holds every
per-point gradient: one ordinary backward per chunk instead of one per point, no vmap. The full Jacobian
takes one backward of sum_i f_k(x_i) per output k (K backwards per chunk), and its spectral norm comes
from the K x K Gram matrix. How much this gains over a per-point loop depends on the network: a
per-point loop costs a fixed ~0.1-0.2 ms of Python and dispatch per point on CPU, which dominates a
small MLP (50k multiply-adds per point) but not the 2-block cnn on 28x28 (670k per point forward, about
as many backward), where the batched version is bound by the same arithmetic (benchmarks/lipschitz.py).

Points (`where`), per replicate m, the same for every snapshot:

- `train`: the replicate's n training inputs (stored with `record.inputs`, else the data set rebuilt from
  the stored config).
- `test`: the n_test test inputs.
- `far-gaussian`: n samples of N(mu, FAR_SCALE^2 * Sigma), mu and Sigma the mean and covariance of the
  replicate's flattened training inputs: the data's Gaussian fit, scaled out 3x around its mean.
- `far-midpoint`: midpoints (x_i + x_j) / 2 of n random training pairs i != j.
  Both far sets have as many points as the training set; seeded by FAR_SEED and the replicate number.

Output: one row per (step, replicate, where); `where="far"` gives both far rows, `all` every row, and a
collection such as `("train", "far")` the union of its sets (only those are computed).
Quantiles are `np.quantile` (linear interpolation) of the per-point values; a quantile q is named
`q{100 q:g}` (0.1 -> q10, 0.25 -> q25), except 1.0 -> `max` and 0.0 -> `min`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from gentrace.analyses.bits import resolve_device
from gentrace.analyses.gsnr import epochs_of
from gentrace.analyses.replay import Replay
from gentrace.core.errors import AnalysisInputError
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.task.batching import CHUNK_ELEMENTS, MAX_CHUNK, auto_chunk, layout

__all__ = ["CHUNK_ELEMENTS", "MAX_CHUNK", "auto_chunk", "input_gradient_norms", "run"]

WHERE = ("train", "test", "far", "all")
GROUPS = {
    "train": ("train",),
    "test": ("test",),
    "far": ("far-gaussian", "far-midpoint"),
    "all": ("train", "test", "far-gaussian", "far-midpoint"),
}
FAR_SCALE = 3.0
FAR_SEED = 0
# points per backward on CPU: ~2^17 input numbers (167 28x28 images, 13107 10-d vectors), so a conv
# net's activations stay near the cache (2048 28x28 images made every 16-channel activation 100 MB and
# the batched cnn 2.3x slower, about as slow as a per-point loop) while an MLP still gets large matrix
# products; a GPU
# has no such cache cliff and wants large launches: 2^22 (5350 28x28 images, ~0.3 GB per cnn activation)


# -- pure helpers ---------------------------------------------------------------------------------
def quantile_columns(quantiles: Sequence[float]) -> list[str]:
    """Column name of each quantile: 0.1 -> q10, 0.5 -> q50, 1.0 -> max, 0.0 -> min."""
    names = []
    for q in quantiles:
        if not 0.0 <= float(q) <= 1.0:
            raise AnalysisInputError(f"lipschitz: quantiles must lie in [0, 1], got {q}")
        names.append("max" if q == 1.0 else "min" if q == 0.0 else f"q{100 * float(q):.10g}")
    if len(set(names)) != len(names):
        raise AnalysisInputError(f"lipschitz: quantiles {list(quantiles)} repeat a value")
    return names


def spectral_norm(jac: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in `jac: [B, K, D]` -> `[B]`.

    sigma_max(J) = sqrt(lambda_max(J J^T)) on the small side's Gram matrix ([B, K, K] when K <= D):
    an eigendecomposition of a 10x10 matrix instead of an SVD of a 10x784 one (about 15x faster on CPU;
    the SVD took ~15% of the cnn's Jacobian time).
    The largest eigenvalue of a Gram matrix is perfectly conditioned, so squaring loses no accuracy
    for sigma_max (it would for the smallest one); float64 for the small eigenproblem all the same.
    """
    gram = jac @ jac.transpose(1, 2) if jac.shape[1] <= jac.shape[2] else jac.transpose(1, 2) @ jac
    return torch.linalg.eigvalsh(gram.double())[:, -1].clamp_min(0.0).sqrt().to(jac.dtype)


def input_gradient_norms(
    model: nn.Module, x: torch.Tensor, *, jacobian: bool = False, chunk: int | None = None
) -> torch.Tensor:
    """Local Lipschitz constant of `model` at each point (see the module docstring).

    Args:
        model: maps `[B, *input_shape] -> [B, K]` (or `[B]`); put it in eval mode first, so points are independent.
        x: `[N, *input_shape]` points, on the model's device and dtype.
        jacobian: spectral norm of the full `[K, D]` input Jacobian instead of the selected output's gradient.
        chunk: points per forward/backward; None: `auto_chunk(x)`.

    Returns:
        `[N]` values, on x's device.
    """
    chunk = chunk or auto_chunk(x)
    memory_format = layout(x)
    out = []
    for start in range(0, len(x), chunk):
        xb = x[start : start + chunk].detach().contiguous(memory_format=memory_format).requires_grad_(True)
        with torch.enable_grad():
            f = model(xb).reshape(len(xb), -1)  # [B, K]
            if jacobian and f.shape[1] > 1:
                # row k of every point's Jacobian: one backward of sum_i f_k(x_i) (points are independent)
                rows = [
                    torch.autograd.grad(f[:, k].sum(), xb, retain_graph=k + 1 < f.shape[1])[0].flatten(1)
                    for k in range(f.shape[1])
                ]
                out.append(spectral_norm(torch.stack(rows, dim=1)))  # [B, K, D] -> [B]
                continue
            selected = f[:, 0] if f.shape[1] == 1 else f.gather(1, f.argmax(1, keepdim=True))[:, 0]
            (grad,) = torch.autograd.grad(selected.sum(), xb)
        out.append(grad.flatten(1).norm(dim=1))
    return torch.cat(out) if out else x.new_zeros(0)


def far_points(x_train: np.ndarray, seed: Sequence[int], scale: float = FAR_SCALE) -> dict[str, np.ndarray]:
    """Points far from the data: `far-gaussian` and `far-midpoint`, each `[n, *input_shape]` float32.

    Args:
        x_train: `[n, *input_shape]` training inputs of one replicate.
        seed: entropy of the generator (np.random.default_rng), e.g. (FAR_SEED, replicate).
        scale: the Gaussian's standard deviation in units of the data's, along every principal axis.
    """
    n, shape = len(x_train), x_train.shape[1:]
    flat = np.asarray(x_train, dtype=np.float64).reshape(n, -1)
    rng = np.random.default_rng(list(seed))
    mu = flat.mean(axis=0)
    # eigh, not Cholesky: image covariances are singular (constant pixels, n < D)
    eigval, eigvec = np.linalg.eigh(np.cov(flat, rowvar=False, bias=True).reshape(flat.shape[1], flat.shape[1]))
    root = eigvec * np.sqrt(np.clip(eigval, 0.0, None))  # Sigma = root @ root.T
    gaussian = mu + scale * rng.standard_normal((n, flat.shape[1])) @ root.T
    if n >= 2:
        i = rng.integers(0, n, size=n)
        j = (i + rng.integers(1, n, size=n)) % n  # j != i
        midpoint = (flat[i] + flat[j]) / 2
    else:
        midpoint = np.zeros((0, flat.shape[1]))
    return {
        "far-gaussian": gaussian.reshape(n, *shape).astype(np.float32),
        "far-midpoint": midpoint.reshape(len(midpoint), *shape).astype(np.float32),
    }


def compute(
    values: Mapping[str, np.ndarray], step: int, epoch: int, replicate: int, quantiles: Sequence[float]
) -> pd.DataFrame:
    """Summary rows of per-point values (pure): one row per key of `values` (the `where` label).

    Args:
        values: where -> `[n]` per-point Lipschitz constants.
        step: the snapshot's optimizer step.
        epoch: completed epochs at `step`.
        replicate: the replicate the values belong to.
        quantiles: quantile levels in [0, 1]; see `quantile_columns` for their column names.

    Returns:
        step, epoch, replicate, where, one column per quantile, mean, n (NaN statistics when n = 0).
    """
    names = quantile_columns(quantiles)
    rows = []
    for where, v in values.items():
        v64 = np.asarray(v, dtype=np.float64)
        qs = np.quantile(v64, list(quantiles)) if v64.size else np.full(len(names), np.nan)
        rows.append(
            {
                "step": step,
                "epoch": epoch,
                "replicate": replicate,
                "where": where,
                **dict(zip(names, (float(q) for q in qs), strict=True)),
                "mean": float(v64.mean()) if v64.size else np.nan,
                "n": int(v64.size),
            }
        )
    columns = ["step", "epoch", "replicate", "where", *names, "mean", "n"]
    types = {c: "int64" for c in ("step", "epoch", "replicate", "n")} | {"where": "str"}
    return pd.DataFrame(rows, columns=columns).astype({c: types.get(c, "float64") for c in columns})


def groups_of(where: str | Collection[str]) -> tuple[str, ...]:
    """Point sets to compute for `where`: a name of WHERE or a set label, or a collection of them (GROUPS order)."""
    names = [where] if isinstance(where, str) else list(where)
    known = (*WHERE, *GROUPS["all"][2:])
    bad = [w for w in names if w not in known]
    if bad or not names:
        shown = bad[0] if bad else where
        raise AnalysisInputError(
            f"lipschitz: where must be one of {', '.join(known)} or a collection of them, not {shown!r}"
        )
    wanted = {g for w in names for g in GROUPS.get(w, (w,))}
    return tuple(g for g in GROUPS["all"] if g in wanted)


# -- the store side -------------------------------------------------------------------------------
def _points(replay: Replay, groups: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Per replicate: where -> `[n, *input_shape]` float32 points."""
    out = []
    for m in range(replay.replicates):
        x_train = replay.inputs("train", m).numpy()
        far = far_points(x_train, (FAR_SEED, m)) if any(g.startswith("far") for g in groups) else {}
        every = {"train": x_train, "test": replay.inputs("test", m).numpy(), **far}
        out.append({g: every[g] for g in groups})
    return out


def run(
    reader: StoreReader,
    where: str | Collection[str] = "all",
    quantiles: Sequence[float] = (0.1, 0.5, 0.9, 1.0),
    jacobian: bool = False,
    device: str | None = None,
    model: nn.Module | None = None,
) -> pd.DataFrame:
    """Local Lipschitz statistics of every parameter snapshot (SPEC section 5, `gentrace analyze lipschitz`).

    Args:
        reader: an opened store with parameter snapshots of every tensor (`record.params`).
        where: train | test | far | all (or one far set: far-gaussian | far-midpoint), or a collection of
            them: only those point sets are computed; see the module docstring for the points.
        quantiles: levels in [0, 1], one column each (0.1 -> q10, 1.0 -> max).
        jacobian: spectral norm of the input Jacobian instead of the predicted-class logit's gradient.
        device: "cpu", "cuda", "cuda:N"; None or "auto": cuda when available, else cpu.
        model: the run's network, given in code (from Python only; a store of gentrace.Run with
            `model.arch = "own"` needs it): a copy of it is loaded with each snapshot instead of the network
            rebuilt from the stored config (gentrace.analyses.replay).

    Returns:
        step, epoch, replicate, where, the quantile columns, mean, n; one row per snapshot, replicate
        and point set.

    Raises:
        MissingStreamError: the run recorded no parameter snapshots.
        AnalysisInputError: unknown `where`, a quantile outside [0, 1], snapshots of only some tensors (or not
            of `model`'s), or a network or inputs given in code that the store cannot rebuild.
        ConfigError: a device that is not one of those, or a GPU that torch does not see.
    """
    groups = groups_of(where)
    quantile_columns(quantiles)  # fail on bad levels before the slow part
    reader.require(schema.PARAMS)
    dev = torch.device(resolve_device(device))  # a device that is not there is refused before the slow part
    replay = Replay(reader, "lipschitz", model)
    net = replay.model().to(dev).eval()
    net.requires_grad_(False)  # input gradients only
    steps = replay.steps  # read once: a live run may commit more rows while this runs
    epochs = epochs_of(reader, steps)
    points = [{w: torch.from_numpy(x).to(dev) for w, x in p.items()} for p in _points(replay, groups)]
    frames = []
    for g in range(len(steps)):
        for m, sets in enumerate(points):
            replay.load(net, g, m)
            values = {w: input_gradient_norms(net, x, jacobian=jacobian).cpu().numpy() for w, x in sets.items()}
            frames.append(compute(values, int(steps[g]), int(epochs[g]), m, quantiles))
    return pd.concat(frames, ignore_index=True)
