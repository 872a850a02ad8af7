"""Exact summation: identical bits for every order and partition, error within the documented bound."""
from fractions import Fraction

import numpy as np
import pytest

from distnn import Network
from distnn.exactsum import (MAX_CHUNKS, NonFiniteError, encode, exact_sum_serial, grid_sum_serial,
                             local_maxabs, magic_for, round_to_grid, SignalGrid)

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


def quantum(magic):
    """q from M = 1.5 * 2**52 * q, exactly."""
    return Fraction(float(magic)) / (Fraction(3, 2) * 2**52)


def encoded(rows, magic):
    m = rows.shape[1]
    return encode(rows, magic, np.empty(m))


def grouped_sum(rng, rows, magic):
    """The float64 sum as ranks would make it: each group encoded alone, groups added in some order."""
    total = np.zeros(rows.shape[1])
    for g in random_groups(rng, len(rows)):
        total += encoded(rows[g], magic)  # an MPI SUM: any order of these additions
    return total


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_partition_and_order_gives_identical_bits(dtype):
    rng = np.random.default_rng(1)
    rows = wide_rows(rng, dtype)
    magic = magic_for(local_maxabs(rows), len(rows))
    reference = encoded(rows, magic)
    expected = exact_sum_serial(rows)
    assert expected.tobytes() == reference.astype(dtype).tobytes()
    for _ in range(60):
        assert grouped_sum(rng, rows, magic).tobytes() == reference.tobytes()
        assert exact_sum_serial(rows[rng.permutation(len(rows))]).tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_within_documented_bound(dtype):
    # |result - exact sum| <= n q / 2 + half an ulp of the result (one rounding to dtype)
    rng = np.random.default_rng(2)
    rows = wide_rows(rng, dtype, n=9, m=80)
    magic = magic_for(local_maxabs(rows), len(rows))
    result = exact_sum_serial(rows)
    assert result.dtype == dtype
    for j in range(rows.shape[1]):
        exact = sum(Fraction(float(x)) for x in rows[:, j])
        bound = len(rows) * quantum(magic[j]) / 2 + Fraction(float(np.spacing(abs(result[j])))) / 2
        assert abs(Fraction(float(result[j])) - exact) <= bound, j


def test_the_quantum_follows_frexp_and_the_chunk_count():
    big = np.array([0.0, 1e-300, 1.0, 0.75, 3.0, 1e300])
    for n in (0, 1, 2, 3, 1000, MAX_CHUNKS):
        k = max(n - 1, 0).bit_length()
        expected = [Fraction(2) ** int(e + k - 51) for e in np.frexp(big)[1]]
        assert [quantum(m) for m in magic_for(big, n)] == expected
    small = np.array([1e-45, 1e-38, 3e38], np.float32)
    assert [quantum(m) for m in magic_for(small, 4)] == [Fraction(2) ** int(e - 49)
                                                         for e in np.frexp(small)[1]]


def test_quanta_below_the_smallest_subnormal_are_raised_to_it():
    # 5e-324 = 2**-1074: its quantum would be 2**-1124; the grid stops at 2**-1074, still exact
    assert [quantum(m) for m in magic_for(np.array([5e-324, 1e-310]), 8)] == [Fraction(2) ** -1074] * 2
    rows = np.array([[5e-324, 3e-310], [5e-324, -1e-310], [0.0, 1e-320]])
    assert exact_sum_serial(rows).tolist() == [1e-323, 2e-310 + 1e-320]


def test_chunks_round_half_to_even_in_units_of_the_quantum():
    # two chunks with max |x| = 1.0: E = 1, k = 1, so the quantum is 2**(1 + 1 - 51) = 2**-49
    magic = magic_for(np.ones(6), 2)
    assert {quantum(m) for m in magic} == {Fraction(2) ** -49}
    halves = np.array([2.5, -2.5, 3.5, 0.5, -0.5, 2.25]) * 2.0**-49
    assert (round_to_grid(halves, magic, np.empty(6)) / 2.0**-49).tolist() == [2, -2, 4, 0, 0, 2]


def test_float32_chunks_keep_every_bit_and_float64_ones_lose_at_most_half_a_quantum():
    rng = np.random.default_rng(4)
    row = wide_rows(rng, np.float32, n=1)
    assert exact_sum_serial(row).tobytes() == row[0].tobytes()  # 24 bits sit well inside 51
    row = wide_rows(rng, np.float64, n=1)
    magic = magic_for(local_maxabs(row), 1)
    error = [abs(Fraction(float(a)) - Fraction(float(b))) for a, b in zip(exact_sum_serial(row), row[0])]
    assert all(e <= quantum(m) / 2 for e, m in zip(error, magic))


def test_zero_columns_sum_to_zero():
    rows = np.zeros((4, 3))
    rows[:, 1] = [1.5, -1.5, 0.0, 0.0]
    assert exact_sum_serial(rows).tolist() == [0.0, 0.0, 0.0]
    assert exact_sum_serial(np.zeros((0, 3))).tolist() == [0.0, 0.0, 0.0]  # no chunks at all


@pytest.mark.parametrize("n", [1, 2, 3, 1000, MAX_CHUNKS])
def test_every_partial_sum_stays_exact_up_to_max_chunks(n):
    # worst case: every chunk at the max, a max just below a power of two so that rint rounds up;
    # n such terms must still sum within 2**51 q, where float64 holds every multiple of q
    maxabs = np.array([np.nextafter(1.0, 0.0), 1.0, np.nextafter(2.0**-1000, 0), 5e-324, 1e300])
    magic = magic_for(maxabs, n)
    for sign in (1.0, -1.0):
        term = round_to_grid(sign * maxabs, magic, np.empty(5))
        units = [Fraction(float(t)) / quantum(m) for t, m in zip(term, magic)]
        assert all(u.denominator == 1 and n * abs(u) <= 2**51 for u in units)


def test_refuses_more_than_max_chunks():
    magic_for(np.ones(2), MAX_CHUNKS)
    with pytest.raises(ValueError, match=r"at most MAX_CHUNKS = 2\*\*20 .* got 1048577"):
        magic_for(np.ones(2), MAX_CHUNKS + 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_detected_before_conversion(bad):
    rows = np.ones((3, 8))
    rows[1, 5] = bad
    maxabs = local_maxabs(rows)
    assert maxabs[5] == np.inf  # NaN becomes Inf so that an MPI MAX carries it to every rank
    with pytest.raises(NonFiniteError, match="1 of 8 elements are NaN or Inf .first at index 5"):
        magic_for(maxabs, 3)
    with pytest.raises(NonFiniteError):
        exact_sum_serial(rows)


@pytest.mark.parametrize("n", [1, 2])
def test_values_next_to_float64s_largest_have_no_grid(n):
    # one chunk just below 2**1022 rounds up to 2**51 q, and M + x would be 2**1024: refused, not Inf
    for big in (1.7e308, np.nextafter(2.0**1022, 0)):
        with pytest.raises(NonFiniteError, match="too close to float64's largest"):
            exact_sum_serial(np.full((n, 1), big))
    assert exact_sum_serial(np.full((n, 1), 2.0**1020 / n)).tolist() == [2.0**1020]


@pytest.mark.parametrize("rows", [np.ones(3), np.ones((2, 3), np.int64), np.ones((2, 3, 1))])
def test_rejects_rows_that_are_not_2d_floats(rows):
    with pytest.raises(ValueError, match="n_chunks, m"):
        exact_sum_serial(rows)


# ---- gradients: the grid from the layers' signal bounds ------------------------------------------
def network_chunks(dtype, n_chunks=7, c=16, seed=5):
    """Chunk gradients of a real network and the MAX of their signal bounds, as the trainer makes them."""
    net = Network([6, 9, 4], activation="relu", family="multinomial", dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    rows = np.empty((n_chunks, net.n_params), dtype)
    bounds = 0
    for i in range(n_chunks):
        X = (rng.standard_normal((c, 6)) * 10.0 ** rng.integers(-3, 4, size=6)).astype(dtype)
        net.grad_sum(X, net.check_targets(rng.integers(0, 4, c)), rows[i])
        bounds = np.maximum(bounds, net.last_signal_maxabs(X))
    return net, rows, bounds, [w.shape for w in net.weights], c


@pytest.mark.parametrize("dtype", DTYPES)
def test_signal_bounds_hold_every_chunk_gradient_inside_its_window(dtype):
    # |x| <= 2**(51 - k) q for every chunk and parameter: what makes the rounding and the sums exact
    _, rows, bounds, shapes, c = network_chunks(dtype)
    k = max(len(rows) - 1, 0).bit_length()
    magic = SignalGrid(bounds, shapes, c, len(rows)).magic()
    window = magic / 1.5 / 2.0**(1 + k)  # 2**(51 - k) q, q = M / (1.5 * 2**52)
    assert (np.abs(rows) <= window).all()
    assert (np.abs(rows).max(axis=0) > window / 2.0**20).mean() > 0.5  # and the bound is not slack


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_sums_are_identical_for_any_split_and_within_the_bound(dtype):
    rng = np.random.default_rng(6)
    _, rows, bounds, shapes, c = network_chunks(dtype)
    magic = SignalGrid(bounds, shapes, c, len(rows)).magic()
    reference = encoded(rows, magic)
    assert grid_sum_serial(rows, bounds, shapes, c).tobytes() == reference.astype(dtype).tobytes()
    for _ in range(30):
        assert grouped_sum(rng, rows, magic).tobytes() == reference.tobytes()
    for j in range(0, rows.shape[1], 7):
        exact = sum(Fraction(float(x)) for x in rows[:, j])
        assert abs(Fraction(float(reference[j])) - exact) <= len(rows) * quantum(magic[j]) / 2


def test_the_grid_is_the_outer_sum_of_the_layers_exponents():
    # layer (2 outputs, 3 inputs), c = 4 (h = 3), n = 2 (k = 1): q_jk = 2**(A_j + B_k + 3 + 1 - 51)
    a, b = np.array([0.75, 3.0]), np.array([1.0, 0.0, 2.0**-20])
    A, B = np.frexp(a)[1], np.frexp(b)[1]
    q = [quantum(m) for m in SignalGrid(np.concatenate([a, b]), [(2, 3)], 4, 2).magic()]
    weights = [Fraction(2) ** int(A[j] + B[k] - 47) for j in range(2) for k in range(3)]
    biases = [Fraction(2) ** int(A[j] + 1 - 47) for j in range(2)]  # a column of ones: B = 1
    assert q == weights + biases


def test_the_grid_refuses_non_finite_or_huge_bounds_and_raises_tiny_ones():
    shapes = [(2, 3)]
    with pytest.raises(NonFiniteError, match="layer signals are NaN or Inf"):
        SignalGrid([1.0, np.inf, 1.0, 1.0, 1.0], shapes, 4, 2)
    with pytest.raises(NonFiniteError, match="too close to float64's largest"):
        SignalGrid([1e300, 1.0, 1e10, 1.0, 1.0], shapes, 4, 2)
    tiny = SignalGrid([1e-300, 1.0, 1e-300, 1.0, 1.0], shapes, 4, 2).magic()  # 1e-300 < 2**-996
    assert [quantum(m) for m in tiny[:2]] == [Fraction(2) ** -1074, Fraction(2) ** (-996 + 1 - 47)]
    with pytest.raises(ValueError, match="do not fit layers"):
        SignalGrid(np.ones(4), shapes, 4, 2)


def test_the_grid_built_block_by_block_is_the_grid(monkeypatch):
    # encode rebuilds M in cache-sized blocks; blocks of 4 cut rows of every layer and their biases
    _, rows, bounds, shapes, c = network_chunks(np.float32)
    whole = SignalGrid(bounds, shapes, c, len(rows))
    magic = whole.magic()
    expected = encoded(rows, magic)
    monkeypatch.setattr(SignalGrid, "BLOCK", 4)
    small = SignalGrid(bounds, shapes, c, len(rows))
    assert small.magic().tobytes() == magic.tobytes()
    assert small.encode(rows, np.empty(rows.shape[1])).tobytes() == expected.tobytes()
