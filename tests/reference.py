"""Slow, obvious references (STYLE habit 1) and tiny synthetic stores built from them.

Every reference starts from stacked per-sample gradients in float64 and walks them with explicit
Python loops, using the paper's definitions directly (shared/papers/gsnr-osgr-generalization.txt):
mean and two-pass variance per parameter, counts of signs, eq. 17, 20, 21 and 22 term by term. A
parameter has zero variance exactly when all its samples are equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gentrace.store import schema
from gentrace.store.writer import RowBlock, create_store

# One recorded step: replicate m -> tensor name -> per-sample gradients [n, *shape] float64.
Step = Sequence[Mapping[str, np.ndarray]]


# -- references ------------------------------------------------------------------------------------
def param_stats(grads: np.ndarray) -> list[dict[str, float]]:
    """Per parameter of grads [n, *shape] (flat order): mean, var, gsnr, same_sign, constant, pos, neg."""
    n = grads.shape[0]
    flat = grads.reshape(n, -1)
    out = []
    for q in range(flat.shape[1]):
        column = [float(flat[i, q]) for i in range(n)]
        mean = sum(column) / n
        constant = all(v == column[0] for v in column)
        var = 0.0 if constant else sum((v - mean) ** 2 for v in column) / n
        pos = sum(1 for v in column if v > 0)
        neg = sum(1 for v in column if v < 0)
        out.append(
            {
                "mean": mean,
                "var": var,
                "gsnr": math.nan if constant else mean * mean / var,
                "same_sign": max(pos, neg) / (pos + neg) if pos + neg else math.nan,
                "constant": constant,
            }
        )
    return out


def gsnr_summary(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """gsnr_mean, gsnr_median, same_sign, zero_variance over every parameter of the given tensors."""
    stats = [s for grads in tensors.values() for s in param_stats(grads)]
    r = sorted(s["gsnr"] for s in stats if not s["constant"])
    signs = [s["same_sign"] for s in stats if not math.isnan(s["same_sign"])]
    median = math.nan
    if r:
        half = len(r) // 2
        median = r[half] if len(r) % 2 else (r[half - 1] + r[half]) / 2
    return {
        "gsnr_mean": sum(r) / len(r) if r else math.nan,
        "gsnr_median": median,
        "same_sign": sum(signs) / len(signs) if signs else math.nan,
        "zero_variance": sum(1 for s in stats if s["constant"]),
    }


def osgr_rhs(step: Step) -> tuple[float, float]:
    """Eq. 17 with eq. 22, and eq. 20 with r_q = mean_m k^2 / mean_m rho^2, over M replicates."""
    replicates = len(step)
    n = next(iter(step[0].values())).shape[0]
    ek2: list[float] = []
    rho2: list[float] = []
    for name in step[0]:
        per_rep = [param_stats(step[m][name]) for m in range(replicates)]
        for q in range(len(per_rep[0])):
            ek2.append(sum(per_rep[m][q]["mean"] ** 2 for m in range(replicates)) / replicates)
            rho2.append(sum(per_rep[m][q]["var"] for m in range(replicates)) / replicates)
    total = sum(ek2)
    rhs = 1 - sum(rho2) / (n * total)
    weighted = 0.0
    for e, v in zip(ek2, rho2, strict=True):
        if v == 0:
            continue  # r_q = inf: W_q / (r_q + 1/n) = 0
        r_q = e / v
        weighted += (e / total) / (r_q + 1 / n)
    return rhs, 1 - weighted / n


def osgr_lhs(t: int, metric_steps: Sequence[int], train: np.ndarray, test: np.ndarray) -> float:
    """Eq. 21 from metrics rows [R, M]; NaN without rows at t and t + 1."""
    steps = list(metric_steps)
    if t not in steps or t + 1 not in steps:
        return math.nan
    a, b = steps.index(t), steps.index(t + 1)
    d_test = sum(float(test[b, m]) - float(test[a, m]) for m in range(test.shape[1]))
    d_train = sum(float(train[b, m]) - float(train[a, m]) for m in range(train.shape[1]))
    return d_test / d_train


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Textbook Pearson correlation."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((x[i] - mx) * (y[i] - my) for i in range(n))
    sxx = sum((x[i] - mx) ** 2 for i in range(n))
    syy = sum((y[i] - my) ** 2 for i in range(n))
    return sxy / math.sqrt(sxx * syy)


# -- synthetic per-sample gradients and stores -------------------------------------------------------
SHAPES: dict[str, tuple[int, ...]] = {"0.weight": (3, 4), "0.bias": (3,), "2.weight": (2, 3)}


def random_grads(
    rng: np.random.Generator, n: int, shapes: Mapping[str, tuple[int, ...]] = SHAPES, zeros: float = 0.3
) -> dict[str, np.ndarray]:
    """Per-sample gradients [n, *shape]: per-parameter means N(0, 1) plus unit noise, a fraction exactly 0."""
    out = {}
    for name, shape in shapes.items():
        grads = rng.normal(size=shape) + rng.normal(size=(n, *shape))
        grads[rng.random(size=grads.shape) < zeros] = 0.0  # ReLU nets have many exact zeros
        out[name] = grads
    return out


def moments_row(step: Step) -> dict[str, np.ndarray]:
    """The store row of one recorded step: grad/<t>/sum|sumsq|pos|neg [1, M, *shape], grad/n, grad/loss_sum."""
    replicates = len(step)
    row: dict[str, np.ndarray] = {
        "grad/n": np.array([[next(iter(step[m].values())).shape[0] for m in range(replicates)]], np.int64),
        "grad/loss_sum": np.zeros((1, replicates), np.float64),
    }
    for name in step[0]:
        stacked = np.stack([step[m][name] for m in range(replicates)])  # [M, n, *shape]
        row[f"grad/{name}/sum"] = stacked.sum(axis=1)[None].astype(np.float32)
        row[f"grad/{name}/sumsq"] = (stacked**2).sum(axis=1)[None].astype(np.float32)
        row[f"grad/{name}/pos"] = (stacked > 0).sum(axis=1)[None].astype(np.int32)
        row[f"grad/{name}/neg"] = (stacked < 0).sum(axis=1)[None].astype(np.int32)
    return row


def write_store(
    path: Path,
    steps: Sequence[int],
    grads: Sequence[Step],
    *,
    steps_per_epoch: int = 10,
    metric_steps: Sequence[int] = (),
    train_loss: np.ndarray | None = None,
    test_loss: np.ndarray | None = None,
    with_grad: bool = True,
) -> Path:
    """A store with a `grad` stream (one row per entry of `steps`) and optionally a `metrics` stream."""
    replicates = len(grads[0]) if grads else (np.shape(train_loss)[1] if np.ndim(train_loss) == 2 else 1)
    shapes = {name: g.shape[1:] for name, g in grads[0][0].items()} if grads else {}
    streams = [schema.grad_stream(len(steps), replicates, shapes)] if with_grad else []
    if len(metric_steps):
        streams.append(schema.metrics_stream(len(metric_steps), replicates))
    attrs = {"steps_per_epoch": steps_per_epoch, "config": {}, "replicates": replicates}
    writer = create_store(path, attrs, streams, {})
    writer.start()
    if with_grad:
        for g, (t, step) in enumerate(zip(steps, grads, strict=True)):
            writer.put(RowBlock("grad", g, {"grad/step": np.array([t], np.int64), **moments_row(step)}))
    if len(metric_steps):
        assert train_loss is not None
        assert test_loss is not None
        rows = len(metric_steps)
        ms = np.asarray(metric_steps, np.int64)
        metrics = {
            "metrics/step": ms,
            "metrics/epoch": (ms // steps_per_epoch).astype(np.int32),
            "metrics/lr": np.full(rows, 0.01),
            "metrics/train_loss": np.asarray(train_loss, np.float32),
            "metrics/test_loss": np.asarray(test_loss, np.float32),
            "metrics/train_acc": np.full((rows, replicates), 0.5, np.float32),
            "metrics/test_acc": np.full((rows, replicates), 0.5, np.float32),
        }
        writer.put(RowBlock("metrics", 0, metrics))
    writer.close("complete")
    return path


# -- mutual information by explicit counting (mi analysis) ----------------------------------------
def counts_of(*columns: Sequence[int]) -> dict[tuple[int, ...], int]:
    """How often each tuple of values occurs across the columns (a dict, one Python loop)."""
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(columns[0])):
        key = tuple(int(c[i]) for c in columns)
        counts[key] = counts.get(key, 0) + 1
    return counts


def entropy_by_counting(*columns: Sequence[int]) -> float:
    """Plug-in entropy in bits of the joint of `columns`: -sum p log2 p over counted tuples."""
    n = len(columns[0])
    return -sum((c / n) * math.log2(c / n) for c in counts_of(*columns).values())


def mi_by_counting(f: Sequence[int], y: Sequence[int], l: Sequence[int]) -> dict[str, float]:  # noqa: E741
    """I(F;Y), I(F;Y|L), I(L;Y|F), I(L;Y), mu from the definitions as sums over counted outcomes.

    I(A;B) = sum p(a,b) log2 p(a,b) / (p(a) p(b));  I(A;B|C) = sum p(a,b,c) log2 p(c) p(a,b,c) / (p(a,c) p(b,c)).
    """
    n = len(f)

    def mi(a: Sequence[int], b: Sequence[int]) -> float:
        pa, pb = counts_of(a), counts_of(b)
        return sum(
            (c / n) * math.log2((c / n) / ((pa[(x,)] / n) * (pb[(z,)] / n))) for (x, z), c in counts_of(a, b).items()
        )

    def cmi(a: Sequence[int], b: Sequence[int], cond: Sequence[int]) -> float:
        pc, pac, pbc = counts_of(cond), counts_of(a, cond), counts_of(b, cond)
        return sum(
            (c / n) * math.log2((pc[(w,)] * c) / (pac[(x, w)] * pbc[(z, w)]))
            for (x, z, w), c in counts_of(a, b, cond).items()
        )

    mi_fy = mi(f, y)
    mi_fy_given_l = cmi(f, y, l)
    return {
        "mi_fy": mi_fy,
        "mi_ly": mi(l, y),
        "mi_fy_given_l": mi_fy_given_l,
        "mi_ly_given_f": cmi(l, y, f),
        "mu": mi_fy - mi_fy_given_l,
    }
