"""nn.Linear: per-sample gradient moments from GEMMs (SPEC section 4; GSNR paper eq. 2).

For a sample i with input a_i [in] and output gradient delta_i [out], the weight gradient is the
outer product g_i = delta_i a_i^T, so with A [B, in] and D [B, out]:

    sum   = D^T A                          sumsq = (D^2)^T (A^2)
    sign_sum = pos - neg = sign(D)^T sign(A)      nonzero = pos + neg = |sign(D)|^T |sign(A)|

(sign(g) = sign(delta) sign(a) elementwise). After a ReLU (A >= 0) sign(A) = |sign(A)| and the two
count GEMMs become one with the left operands stacked. Inputs with extra dims ([B, T, in]) are not
outer products per sample and go through the chunked path of `conv.per_sample_moments`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from torch import nn

from gentrace.moments.accumulator import Stats, stats_of
from gentrace.moments.conv import chunked_moments


def bias_moments(delta: torch.Tensor, signs: bool = True) -> Stats:
    """Moments of a bias whose per-sample gradient is delta [B, out] itself."""
    return stats_of(delta, signs)


def linear_moments(a: torch.Tensor, delta: torch.Tensor, bias: bool, signs: bool = True) -> tuple[Stats, Stats | None]:
    """Moments of W (and, with `bias`, of the bias) for a [B, in], delta [B, out].

    The bias's per-sample gradient is delta itself, so its moments are column sums of the operands the
    weight's GEMMs already formed (delta, delta^2, the sign indicators): three reductions instead of
    `bias_moments`' ten kernels. They are float32 sums over one batch, as the weight's GEMMs are; the
    accumulator adds batches in float64.
    """
    d2 = delta.square()
    s, sq = delta.T @ a, d2.T @ a.square()
    b: Stats | None = (delta.sum(0), d2.sum(0), None, None) if bias else None
    if not signs:
        return (s, sq, None, None), b
    if not a.numel() or a.amin().item() >= 0:  # 3x cheaper than (a >= 0).all(); NaN takes the general path
        # One GEMM for both counts: [sign(D) | |sign(D)|]^T sign(A), where sign(A) = [A > 0]. The left operand
        # is built in the count GEMM's own dtype (int8 where that GEMM pays: a quarter of the bytes to stack).
        sign_d = delta.sign().to(count_dtype(delta))
        left = torch.cat([sign_d, sign_d.abs()], dim=1)
        sign_sum, nonzero = count_mm(left.T, a.sign()).split(delta.shape[1])
        if b is not None:
            b_sign_sum, b_nonzero = left.sum(0, dtype=torch.int32).split(delta.shape[1])
            b = (b[0], b[1], b_sign_sum, b_nonzero)
    else:
        sign_d = delta.sign()
        sign_a, abs_d = a.sign(), sign_d.abs()
        sign_sum, nonzero = count_mm(sign_d.T, sign_a), count_mm(abs_d.T, sign_a.abs())
        if b is not None:
            f32 = torch.float32  # exact to 2^24 whatever delta's dtype (bfloat16 holds integers only to 256)
            b = (b[0], b[1], sign_d.sum(0, dtype=f32).to(torch.int32), abs_d.sum(0, dtype=f32).to(torch.int32))
    return (s, sq, sign_sum, nonzero), b


@functools.cache
def int8_gemm_pays() -> bool:
    """Whether torch's CPU int8 GEMM (`_int_mm`) is faster than a float32 one on this machine and torch.

    Both give the same exact counts; which is faster depends on the torch build: ~6x faster than float32
    when this was written (torch 2.4, oneDNN VNNI), ~18x slower on torch 2.14 here (a 512x128 @ 128x784
    product: 21.5 ms vs 1.2 ms). Timed once per process on a 256 x 256 product, best of 3 each.
    """
    if not hasattr(torch, "_int_mm"):
        return False
    x = torch.ones(256, 256, dtype=torch.int8)
    f = x.float()
    try:
        torch._int_mm(x, x)
    except RuntimeError:
        return False

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: torch._int_mm(x, x)) < best(lambda: f @ f)


def count_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `count_mm` multiplies in for operands like x: int8 where that GEMM pays, else float32 or float64."""
    if x.device.type == "cpu" and int8_gemm_pays():
        return torch.int8
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def count_mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact x @ y for matrices of -1/0/1 entries: an int8 GEMM with int32 results on the CPU where it pays.

    The operands are sign indicators, so int8 loses nothing; where torch's int8 GEMM is slower than its
    float one (`int8_gemm_pays`), or unavailable, a float32 (float64 for float64 operands) GEMM, exact while
    counts stay below 2^24: every partial sum is then an integer float, so the cast to int32 needs no
    rounding. Never a float16 / bfloat16 GEMM, whose integers are exact only to 2^11 / 2^8. Returns int32 counts.
    """
    if x.device.type == "cpu" and int8_gemm_pays():
        try:
            return torch._int_mm(x.to(torch.int8), y.to(torch.int8))  # strided operands are taken as they are
        except RuntimeError:
            pass
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return (x.to(dtype) @ y.to(dtype)).to(torch.int32)


def moments(module: nn.Module, a: torch.Tensor, delta: torch.Tensor, signs: bool = True) -> dict[str, Stats]:
    """Moments of `weight` (and `bias`) of an nn.Linear from its input and per-sample output gradient."""
    assert isinstance(module, nn.Linear)
    if a.dim() == 2:
        weight, bias = linear_moments(a, delta, module.bias is not None, signs)
        return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    a3, d3 = a.flatten(1, -2), delta.flatten(1, -2)  # [B, T, in], [B, T, out]
    out = {"weight": sequence_weight_moments(a3, d3, signs)}
    if module.bias is not None:
        out["bias"] = bias_moments(d3.sum(1), signs)
    return out


def sequence_weight_moments(a3: torch.Tensor, d3: torch.Tensor, signs: bool = True) -> Stats:
    """Moments of W applied at every position: a3 [B, T, in], d3 [B, T, out] -> Stats [out, in].

    Sample i's gradient sum_t delta_it a_it^T is no outer product, so it is formed, a chunk of samples at a time.
    """
    return chunked_moments(lambda lo, hi: d3[lo:hi].transpose(1, 2) @ a3[lo:hi], len(a3), signs=signs)
