"""gentrace.analyses.bits: packing round trips, popcount, and blocked pairwise dot products vs float64 loops."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gentrace.analyses import bits
from gentrace.core.errors import AnalysisInputError, ConfigError


@dataclass(frozen=True)
class Case:
    id: str
    rows: int
    units: int
    density: float = 0.5
    block_units: int | None = None
    block_rows: int = bits.BLOCK_ROWS


CASES = [
    Case("units-13", rows=7, units=13),
    Case("units-64", rows=5, units=64),
    Case("units-1-one-row", rows=1, units=1),
    Case("units-203-sparse", rows=9, units=203, density=0.05),  # many empty rows and pairs
    Case("units-203-dense", rows=9, units=203, density=0.95),
    Case("blocks-of-16-units-and-2-rows", rows=11, units=101, block_units=16, block_rows=2),
    Case("blocks-of-8-units-and-3-rows", rows=10, units=77, block_units=8, block_rows=3),
    Case("no-rows", rows=0, units=30),
]
METHODS = ["int8", "float32", "auto"]


def random_paths(case: Case, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    on = rng.random((case.rows, case.units)) < case.density
    if case.rows > 2:
        on[1] = False  # an empty path
        on[2] = on[0]  # a duplicate
    return on


def brute_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Every a_i . b_j by an explicit float64 loop over units."""
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = sum(float(x) * float(y) for x, y in zip(a[i], b[j], strict=True))
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 4), st.integers(0, 70), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(rows: int, units: int, seed: int) -> None:
    on = np.random.default_rng(seed).random((rows, units)) < 0.5
    packed = bits.pack(on)
    assert packed.dtype == np.uint8
    assert packed.shape == (rows, -(-units // 8))
    np.testing.assert_array_equal(packed, np.packbits(on, axis=-1, bitorder="little"))
    np.testing.assert_array_equal(bits.unpack(packed, units), on)
    np.testing.assert_array_equal(bits.popcount(packed), on.sum(axis=1))
    if units % 8:  # pad bits are zero, so they never count
        assert not (packed[:, -1] >> (units % 8)).any()


def test_unpack_rejects_too_many_units() -> None:
    with pytest.raises(AnalysisInputError, match="17 units do not fit in 2 bytes"):
        bits.unpack(np.zeros((1, 2), np.uint8), 17)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rows_equal_reference(case: Case) -> None:
    on = random_paths(case)
    other = random_paths(case, seed=1)
    a, b = bits.pack(on), bits.pack(other)
    np.testing.assert_array_equal(bits.popcount(a), [sum(map(int, row)) for row in on])
    np.testing.assert_array_equal(bits.and_bits(a, b), bits.pack(on & other))
    expected = [brute_dot(on[i : i + 1], other[i : i + 1])[0, 0] for i in range(case.rows)]
    np.testing.assert_array_equal(bits.dot_rows(a, b), expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gram_equals_reference(case: Case, method: bits.Method) -> None:
    on = random_paths(case)
    got = bits.pairwise_dot(
        bits.pack(on), device="cpu", method=method, block_units=case.block_units, block_rows=case.block_rows
    )
    assert got.dtype == np.int64
    assert got.shape == (case.rows, case.rows)
    np.testing.assert_array_equal(got, brute_dot(on, on))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_two_matrices_equal_reference(case: Case, method: bits.Method) -> None:
    on = random_paths(case)
    other = random_paths(Case(case.id, case.rows + 2, case.units, case.density), seed=3)
    got = bits.pairwise_dot(bits.pack(on), bits.pack(other), device="cpu", method=method, block_units=case.block_units)
    assert got.shape == (case.rows, case.rows + 2)
    np.testing.assert_array_equal(got, brute_dot(on, other))


def test_identical_rows_closed_form() -> None:
    """Every row equal: every entry is the row's count of ones; all-ones rows give `units` exactly."""
    for units in (1, 9, 4096 + 3):
        on = np.ones((20, units), dtype=bool)
        for method in ("int8", "float32"):
            got = bits.pairwise_dot(bits.pack(on), device="cpu", method=method, block_units=1024)  # type: ignore[arg-type]
            assert (got == units).all()


def test_memory_stays_bounded_by_the_block() -> None:
    """float32 method: peak NumPy allocation ~ rows x block_units, far below unpacking every unit."""
    rows, units, block = 64, 400_000, 8192
    a = bits.pack(np.random.default_rng(0).random((rows, units)) < 0.5)
    tracemalloc.start()
    got = bits.pairwise_dot(a, device="cpu", method="float32", block_units=block)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = rows * units * 4  # float32 of every unit at once: 102 MB
    assert peak < whole / 10, f"peak {peak / 2**20:.1f} MiB"
    assert np.array_equal(np.diag(got), bits.popcount(a))


def test_bad_arguments() -> None:
    a = np.zeros((3, 2), np.uint8)
    with pytest.raises(AnalysisInputError, match="method must be one of"):
        bits.pairwise_dot(a, method="popcount")  # type: ignore[arg-type]
    with pytest.raises(AnalysisInputError, match="multiple of 8"):
        bits.pairwise_dot(a, block_units=12)
    with pytest.raises(AnalysisInputError, match=r"\[P, bytes\] and \[Q, bytes\]"):
        bits.pairwise_dot(a, np.zeros((3, 3), np.uint8))
    with pytest.raises(AnalysisInputError, match="at most 2\\*\\*24"):
        bits.pairwise_dot(a, method="float32", block_units=2**25)


def test_resolve_device() -> None:
    assert bits.resolve_device("cpu") == "cpu"
    assert bits.resolve_device(None) == bits.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda:1: torch sees no CUDA GPU here"):
            bits.resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cuda_equals_reference(case: Case) -> None:
    on = random_paths(case)
    got = bits.pairwise_dot(bits.pack(on), device="cuda", method="int8", block_units=case.block_units)
    np.testing.assert_array_equal(got, brute_dot(on, on))
    other = random_paths(Case(case.id, case.rows + 3, case.units), seed=2)
    two = bits.pairwise_dot(bits.pack(on), bits.pack(other), device="cuda", block_rows=case.block_rows)
    np.testing.assert_array_equal(two, brute_dot(on, other))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_code_path_on_the_cpu(case: Case) -> None:
    """The CUDA branch (unpacking by shifts on the device, rows padded for cuBLASLt) runs on the CPU too."""
    engine = bits._Int8("cpu")
    engine.cuda = True
    on = random_paths(case)
    got = bits._blocked(bits.pack(on), None, 2, 3, engine)
    np.testing.assert_array_equal(got, brute_dot(on, on))
    other = random_paths(Case(case.id, case.rows + 5, case.units), seed=4)
    two = bits._blocked(bits.pack(on), bits.pack(other), 1, 3, engine)
    np.testing.assert_array_equal(two, brute_dot(on, other))
