"""Exact summation: identical bits for every order and partition, error within the documented bound."""
from fractions import Fraction

import numpy as np
import pytest

from distnn.exactsum import (MAX_CHUNKS, NonFiniteError, exact_sum_serial, exponents, from_fixed,
                             local_maxabs, to_fixed)

DTYPES = [np.float32, np.float64]


def wide_rows(rng, dtype, n=13, m=120):
    """(n, m) values of both signs over the dtype's whole exponent range, with zeros and zero columns."""
    top = 300 if dtype == np.float64 else 36  # n terms of 10**top must not overflow the dtype
    scale = 10.0 ** rng.integers(-top, top + 1, size=(1, m))  # each column keeps its own magnitude
    spread = 10.0 ** rng.integers(-12, 1, size=(n, m))  # terms within a column span 12 decades
    rows = rng.choice([-1.0, 1.0], size=(n, m)) * rng.random((n, m)) * spread * scale
    rows[rng.random((n, m)) < 0.1] = 0.0
    rows[:, :3] = 0.0
    if dtype == np.float64:
        rows[:, 3] = [5e-324 * i for i in range(n)]  # subnormals
        rows[:, 4] = 1e300 * rng.choice([-1.0, 1.0], n)
    return rows.astype(dtype)


def random_groups(rng, n):
    """A random order of range(n) cut into 1-5 contiguous groups, some possibly empty (ranks with none)."""
    order = rng.permutation(n)
    cuts = np.sort(rng.integers(0, n + 1, size=rng.integers(0, 5)))
    return np.split(order, cuts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_partition_and_order_gives_identical_bits(dtype):
    rng = np.random.default_rng(1)
    rows = wide_rows(rng, dtype)
    e = exponents(local_maxabs(rows), len(rows))
    reference = to_fixed(rows, e)
    expected = exact_sum_serial(rows)
    for _ in range(60):
        groups = random_groups(rng, len(rows))
        total = sum(to_fixed(rows[g], e) for g in reversed(groups))  # each group is one rank's share
        assert np.array_equal(total, reference)
        assert from_fixed(total, e, dtype).tobytes() == expected.tobytes()
        assert exact_sum_serial(rows[rng.permutation(len(rows))]).tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_within_documented_bound(dtype):
    # |result - exact sum| <= n * 2**(e-1) + half an ulp of the result (one rounding to dtype)
    rng = np.random.default_rng(2)
    rows = wide_rows(rng, dtype, n=9, m=80)
    e = exponents(local_maxabs(rows), len(rows))
    result = exact_sum_serial(rows)
    assert result.dtype == dtype
    for j in range(rows.shape[1]):
        exact = sum(Fraction(float(x)) for x in rows[:, j])
        bound = len(rows) * Fraction(2) ** int(e[j] - 1) + Fraction(float(np.spacing(abs(result[j])))) / 2
        assert abs(Fraction(float(result[j])) - exact) <= bound, j


def test_chunks_round_half_to_even_in_units_of_the_quantum():
    # two chunks with max |x| = 1.0: k = 1, e = 1 - 61, so the quantum is 2**-60
    e = exponents(np.ones(6), 2)
    assert e.tolist() == [-60] * 6
    halves = np.array([[2.5, -2.5, 3.5, 0.5, -0.5, 2.25]]) * 2.0**-60
    assert to_fixed(halves, e).tolist() == [2, -2, 4, 0, 0, 2]


def test_quantization_of_32_chunks_is_within_one_float64_rounding_of_the_max():
    # the docstring's instance: n = 32 chunks err by at most 2**-52 * max |x| before the final rounding
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((32, 300)) * 10.0 ** rng.integers(-5, 5, size=300)
    e = exponents(local_maxabs(rows), 32)
    total = to_fixed(rows, e)
    maxabs = np.abs(rows).max(axis=0)
    for j in range(rows.shape[1]):
        exact = sum(Fraction(float(x)) for x in rows[:, j])
        quantized = Fraction(int(total[j])) * Fraction(2) ** int(e[j])
        assert abs(quantized - exact) <= Fraction(2) ** -52 * Fraction(float(maxabs[j]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_chunk_comes_back_unchanged(dtype):
    row = wide_rows(np.random.default_rng(4), dtype, n=1)
    assert exact_sum_serial(row).tobytes() == row[0].tobytes()


def test_zero_columns_sum_to_zero():
    rows = np.zeros((4, 3))
    rows[:, 1] = [1.5, -1.5, 0.0, 0.0]
    assert exact_sum_serial(rows).tolist() == [0.0, 0.0, 0.0]
    assert exact_sum_serial(np.zeros((0, 3))).tolist() == [0.0, 0.0, 0.0]  # no chunks at all


def test_exponents_follow_frexp():
    big = np.array([0.0, 5e-324, 3e-310, 2.2250738585072014e-308, 1.0, 0.75, 1e300, np.finfo(float).max])
    for n in (0, 1, 2, 3, 1000, MAX_CHUNKS):
        k = max(n - 1, 0).bit_length()
        assert exponents(big, n).tolist() == (np.frexp(big)[1] - (62 - k)).tolist()
    small = np.array([1e-45, 1e-38, 3e38], np.float32)
    assert exponents(small, 4).tolist() == (np.frexp(small)[1] - 60).tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 1000, MAX_CHUNKS])
def test_no_int64_overflow_up_to_max_chunks(n):
    # worst case: every chunk at the max, a max just below a power of two, so that rint rounds up
    maxabs = np.array([np.nextafter(1.0, 0.0), 1.0, np.nextafter(2.0**-1000, 0), 5e-324, 1.7e308])
    e = exponents(maxabs, n)
    for sign in (1.0, -1.0):
        one = to_fixed(sign * maxabs[None, :], e)
        assert (np.abs(one) <= 2 ** 62 // 2 ** max(n - 1, 0).bit_length()).all()
        assert (n * np.abs(one).astype(object) < 2**63).all()  # n such chunks fit in int64


def test_refuses_more_than_max_chunks():
    exponents(np.ones(2), MAX_CHUNKS)
    with pytest.raises(ValueError, match=r"at most MAX_CHUNKS = 2\*\*20 .* got 1048577"):
        exponents(np.ones(2), MAX_CHUNKS + 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_detected_before_conversion(bad):
    rows = np.ones((3, 8))
    rows[1, 5] = bad
    maxabs = local_maxabs(rows)
    assert maxabs[5] == np.inf  # NaN becomes Inf so that an MPI MAX carries it to every rank
    with pytest.raises(NonFiniteError, match="1 of 8 elements are NaN or Inf .first at index 5"):
        exponents(maxabs, 3)
    with pytest.raises(NonFiniteError):
        exact_sum_serial(rows)


@pytest.mark.parametrize("rows", [np.ones(3), np.ones((2, 3), np.int64), np.ones((2, 3, 1))])
def test_rejects_rows_that_are_not_2d_floats(rows):
    with pytest.raises(ValueError, match="n_chunks, m"):
        exact_sum_serial(rows)
