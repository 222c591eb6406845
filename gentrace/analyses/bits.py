"""Kernels on packed ReLU path bitmasks: pack, unpack, popcount, and pairwise dot products in blocks.

A path p [units] in {0, 1} (image-functions paper, section 5: p_i^t(n) = 1 when unit n is on for
image i at time t) is stored packed, `np.packbits(p, axis=-1, bitorder="little")`: unit 8k + b is
bit b of byte k, and the pad bits of the last byte are 0. For 0/1 vectors the dot product is the
count of units on in both, and |p|^2 = p . p is the count of ones, so every similarity of
`gentrace.analyses.paths` reduces to

    popcount(a)         [P]     ones per row                        (np.bitwise_count)
    dot_rows(a, b)      [P]     a_i . b_i = popcount(a_i AND b_i)  (row by row, O(P * bytes))
    pairwise_dot(a, b)  [P, Q]  a_i . b_j for every pair           (a matrix product, O(P * Q * units))

`pairwise_dot` is never a loop over pairs: the units are split into blocks of `block_units`; each
block of both operands is unpacked to 0/1 and multiplied as a matrix, and the block products are
summed. With b = a (a Gram matrix, the only case the analyses need) only the blocks on and above
the diagonal are multiplied (columns in blocks of `block_rows`) and the result is mirrored.
Memory stays bounded by the unpacked blocks (rows * block_units bytes in int8, about BLOCK_BYTES by
default) plus the [P, Q] result, whatever the layer width.

Methods (all exact integer counts):
    int8     torch `_int_mm`: int8 x int8 -> int32 (VNNI on CPU, integer tensor cores on CUDA);
             per-block counts <= block_units fit int32 exactly.
    float32  NumPy BLAS sgemm on 0/1 float32 blocks: a float32 sum of 0/1 products is an exact
             integer below 2**24, so a block of at most 2**24 units is exact in any summation order.
    auto     int8 (torch on `device`), float32 where torch's int8 matmul is unavailable.

Measured on 2 AMD EPYC cores (2000 probes x 100,000 units, benchmarks/paths.py, medians of 5):
np.unpackbits + a float64 matmul 3.9 s, float32 2.1 s (1.9x), int8 0.33 s (12x). A popcount of
every pair with np.bitwise_count over uint64 words (AND, count, sum; a row against all rows at a
time) was no faster than the naive matmul (~11 s vs ~9 s, estimated from 400 rows), so popcount
is used only row by row.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from gentrace.core.errors import AnalysisInputError, ConfigError

if TYPE_CHECKING:
    import torch

Method = Literal["auto", "int8", "float32"]
METHODS: tuple[str, ...] = get_args(Method)

# Unpacked operand bytes per unit block: 2000 probes x 65,536 units in int8. Larger blocks run the
# int8 matmul faster (2000 x 100,000 on 2 cores: 0.94 s with 32k-unit blocks, 0.76 s with 64k).
DEVICE = re.compile(
    r"^(auto|cpu|cuda(:\d+)?)$"
)  # what --device accepts (gentrace.training.run.resolve_device likewise)
BLOCK_BYTES = 128 * 2**20
MIN_BLOCK_UNITS = 8192
# Rows per diagonal block of a Gram matrix: small enough to skip ~40% of the work below the
# diagonal at 2000 rows, large enough that each matrix product still runs near peak.
BLOCK_ROWS = 512
FLOAT32_EXACT = 2**24


def pack(on: np.ndarray) -> np.ndarray:
    """[..., units] bool -> [..., ceil(units / 8)] uint8, little bit order (the store's `acts/<layer>/bits`)."""
    return np.packbits(np.asarray(on, dtype=bool), axis=-1, bitorder="little")


def unpack(bits: np.ndarray, units: int) -> np.ndarray:
    """[..., bytes] uint8 -> [..., units] bool; the inverse of `pack` for any units <= 8 * bytes."""
    bits = np.asarray(bits, dtype=np.uint8)
    if not 0 <= units <= 8 * bits.shape[-1]:
        raise AnalysisInputError(f"{units} units do not fit in {bits.shape[-1]} bytes")
    return np.unpackbits(bits, axis=-1, count=units, bitorder="little").astype(bool)


def popcount(bits: np.ndarray) -> np.ndarray:
    """[..., bytes] uint8 -> [...] int64: ones per row, |p|^2 of each path."""
    bits = np.asarray(bits, dtype=np.uint8)
    if hasattr(np, "bitwise_count"):  # NumPy >= 2: a popcount instruction per byte
        return np.bitwise_count(bits).sum(axis=-1, dtype=np.int64)
    return np.unpackbits(bits, axis=-1).sum(axis=-1, dtype=np.int64)


def and_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise product of two paths, packed: [..., bytes] AND [..., bytes] (p * q on 0/1 vectors)."""
    return np.bitwise_and(np.asarray(a, dtype=np.uint8), np.asarray(b, dtype=np.uint8))


def dot_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a_i . b_i for each row: [P, bytes] x [P, bytes] -> [P] int64 (self similarity's numerator)."""
    return popcount(and_bits(a, b))


def resolve_device(device: str | None) -> str:
    """`None`/"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cpu", "cuda", "cuda:N" as given.

    Raises:
        ConfigError: not one of those, or a CUDA device that torch does not see here.
    """
    if device is not None and not DEVICE.match(str(device)):
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return "cpu"
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu or auto")
    index = str(device).partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here; use cuda:0 or auto")
    return str(device)


def pairwise_dot(
    a: np.ndarray,
    b: np.ndarray | None = None,
    *,
    device: str | None = None,
    method: Method = "auto",
    block_units: int | None = None,
    block_rows: int = BLOCK_ROWS,
) -> np.ndarray:
    """All pairwise dot products of packed bit rows, as blocked matrix products: [P, Q] int64.

    Args:
        a: [P, bytes] uint8 packed paths.
        b: [Q, bytes] uint8, or None for the Gram matrix of `a` (symmetric: half the work).
        device: torch device for the int8 method ("cpu", "cuda", "cuda:1"); None picks cuda when
            there is one. The float32 method always runs on the CPU.
        method: int8 | float32 | auto, see the module docstring.
        block_units: units unpacked at a time (a multiple of 8; at most 2**24 for float32); None
            sizes the block so that the unpacked operands take about BLOCK_BYTES.
        block_rows: rows per diagonal block of a Gram matrix.

    Returns:
        [P, Q] int64: entry (i, j) = number of units on in both a_i and b_j.
    """
    if method not in METHODS:
        raise AnalysisInputError(f"pairwise_dot: method must be one of {', '.join(METHODS)}, not {method!r}")
    a = np.ascontiguousarray(a, dtype=np.uint8)
    b_ = a if b is None else np.ascontiguousarray(b, dtype=np.uint8)
    if a.ndim != 2 or b_.ndim != 2 or a.shape[1] != b_.shape[1]:
        raise AnalysisInputError(
            f"pairwise_dot: bit matrices [P, bytes] and [Q, bytes] expected, not {a.shape}, {b_.shape}"
        )
    use_float32 = method == "float32" or (method == "auto" and not _int8_works(resolve_device(device)))
    if block_units is None:
        rows = a.shape[0] + (0 if b is None else b_.shape[0])
        per_unit = rows * (4 if use_float32 else 1)
        block_units = min(FLOAT32_EXACT, max(MIN_BLOCK_UNITS, BLOCK_BYTES // max(1, per_unit) // 8 * 8))
    if block_units <= 0 or block_units % 8:
        raise AnalysisInputError(f"pairwise_dot: block_units must be a positive multiple of 8, not {block_units}")
    block_bytes = block_units // 8
    if use_float32:
        if block_units > FLOAT32_EXACT:
            raise AnalysisInputError(f"pairwise_dot: float32 blocks must hold at most 2**24 units, not {block_units}")
        return _blocked(a, None if b is None else b_, block_bytes, block_rows, _Float32())
    return _blocked(a, None if b is None else b_, block_bytes, block_rows, _Int8(resolve_device(device)))


def _blocked(a: np.ndarray, b: np.ndarray | None, block_bytes: int, block_rows: int, engine: Any) -> np.ndarray:
    """Sum over unit blocks of the engine's products of the unpacked blocks; upper blocks only when b is None."""
    rows_a = a.shape[0]
    rows_b = rows_a if b is None else b.shape[0]
    acc = engine.zeros(rows_a, rows_b)
    if rows_a == 0 or rows_b == 0:
        return np.zeros((rows_a, rows_b), dtype=np.int64)
    starts = list(range(0, rows_a, max(1, block_rows)))
    for lo in range(0, a.shape[1], block_bytes):
        x = engine.unpack(a[:, lo : lo + block_bytes])  # [P, 8 * block_bytes] 0/1
        if b is not None:
            engine.add(acc, slice(None), slice(None), x, engine.unpack(b[:, lo : lo + block_bytes]))
            continue
        for c0 in starts:
            c1 = min(rows_a, c0 + block_rows)
            # columns c0:c1 against rows 0:c1: the diagonal block and everything above it
            engine.add(acc, slice(0, c1), slice(c0, c1), x[:c1], x[c0:c1])
    out = engine.to_numpy(acc)
    if b is None:
        upper = np.triu(out)
        out = upper + np.triu(out, 1).T
    return out


class _Float32:
    """NumPy BLAS: 0/1 float32 blocks, block products added into an int64 accumulator."""

    @staticmethod
    def zeros(p: int, q: int) -> np.ndarray:
        return np.zeros((p, q), dtype=np.int64)

    @staticmethod
    def unpack(bits: np.ndarray) -> np.ndarray:
        return np.unpackbits(bits, axis=-1, bitorder="little").astype(np.float32)

    @staticmethod
    def add(acc: np.ndarray, rows: slice, cols: slice, x: np.ndarray, y: np.ndarray) -> None:
        acc[rows, cols] += (x @ y.T).astype(np.int64)  # exact: integers below 2**24

    @staticmethod
    def to_numpy(acc: np.ndarray) -> np.ndarray:
        return acc


class _Int8:
    """torch `_int_mm` (int8 x int8 -> int32) on any device; bits are unpacked on the device."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.shifts = torch.arange(8, dtype=torch.uint8, device=self.device)
        # cuBLASLt int8 needs more than 16 rows on the left and multiples of 8 elsewhere.
        self.cuda = self.device.type == "cuda"

    def zeros(self, p: int, q: int) -> torch.Tensor:
        # int64: counts summed over all unit blocks can exceed int32 only past 2**31 units, but cost nothing here
        return self.torch.zeros((p, q), dtype=self.torch.int64, device=self.device)

    def unpack(self, bits: np.ndarray) -> torch.Tensor:
        if not self.cuda:  # np.unpackbits is ~10x faster than shifts in torch on the CPU
            return self.torch.from_numpy(np.unpackbits(bits, axis=-1, bitorder="little")).view(self.torch.int8)
        # on a GPU only the packed bytes cross the bus (8x less), unpacked there
        packed = self.torch.from_numpy(np.ascontiguousarray(bits)).to(self.device, non_blocking=True)
        on = (packed.unsqueeze(-1) >> self.shifts) & 1  # little bit order: bit b of byte k is unit 8k + b
        return on.reshape(packed.shape[0], -1).view(self.torch.int8)

    def add(self, acc: torch.Tensor, rows: slice, cols: slice, x: torch.Tensor, y: torch.Tensor) -> None:
        acc[rows, cols] += self._int_mm(x, y)

    def _int_mm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Product x [m, k] @ y [n, k]^T in int32; pads rows to what cuBLASLt accepts on CUDA."""
        m, n = x.shape[0], y.shape[0]
        if self.cuda:
            x = _pad_rows(self.torch, x, max(24, _round_up(m, 8)))
            y = _pad_rows(self.torch, y, _round_up(n, 8))
        return self.torch._int_mm(x, y.T)[:m, :n]

    def to_numpy(self, acc: torch.Tensor) -> np.ndarray:
        return np.asarray(acc.cpu().numpy(), dtype=np.int64)


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def _pad_rows(torch: Any, x: Any, rows: int) -> Any:
    if x.shape[0] == rows:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[0]))


_INT8_OK: dict[str, bool] = {}


def _int8_works(device: str) -> bool:
    """Whether torch `_int_mm` runs (and is exact) on `device`; checked once per device and cached."""
    if device not in _INT8_OK:
        try:
            engine = _Int8(device)
            x = engine.unpack(pack(np.eye(32, 64, dtype=bool) | np.eye(32, 64, k=3, dtype=bool)))
            got = engine.to_numpy(engine._int_mm(x, x).to(engine.torch.int64))
            ok = bool((np.diag(got) == 2).all())
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _INT8_OK[device] = ok
    return _INT8_OK[device]
