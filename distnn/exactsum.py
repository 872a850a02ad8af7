"""Exact, order-free summation of float vectors through int64 fixed point (deterministic mode).

Floating-point addition is not associative, so a sum over ranks depends on how the chunks are split
and on the MPI library's reduction order. Integer addition is associative. Per element j:

    M_j = max_i |x_ij|                     (over ALL n chunks; an MPI MAX is exact and order-free)
    E_j : 2**(E_j-1) <= M_j < 2**E_j       (np.frexp's exponent)
    k   = ceil(log2 n),  e_j = E_j - (62 - k),  q_j = 2**e_j   (the quantum)
    S_j = sum_i rint(x_ij / q_j)           (round half to even, summed in int64)
    result_j = fl(S_j) * q_j               (fl: int64 -> float dtype)

No overflow: |x_ij / q_j| < 2**E_j / 2**(E_j-62+k) = 2**(62-k), so every rounded term is <= 2**(62-k)
in magnitude and any partial sum of at most n <= 2**k terms is <= 2**62 < 2**63. S_j is therefore
the same integer for every order and every partition of the chunks: bit-identical results on any
number of ranks. x / q_j and the final * q_j are exact (power-of-two scaling), so the only roundings are
the n quantizations and the one int64 -> dtype conversion.

Error bound (proved by the above): each quantization errs by at most q_j / 2, so

    |S_j * q_j - sum_i x_ij| <= n * 2**(e_j - 1) = n * 2**(k - 63) * 2**E_j <= n * 2**(k - 62) * M_j,

and the result adds at most half an ulp of itself in the target dtype (one rounding, int64 -> dtype;
a second rounding happens only if the result is subnormal). For n = 32 chunks: <= 2**-52 * M_j, the
size of one float64 rounding of the largest term, while a naive float64 sum of the same terms may err
by up to (n - 1) * 2**-53 * sum_i |x_ij| <= 31 * 32 * 2**-53 * M_j. Up to MAX_CHUNKS = 2**20 chunks
the bound stays below 2**-22 * M_j, finer than float32 resolution.

Non-finite values have no integer image: local_maxabs maps NaN to Inf so that the MPI MAX carries it
to every rank, and exponents() raises NonFiniteError on every rank alike, before anything is
converted; the trainer turns it into its divergence stop.
"""
import operator

import numpy as np

MAX_CHUNKS = 2**20  # k <= 20 keeps the per-chunk quantum <= 2**-41 of the element's largest term
_BITS = 62  # every chunk sum fits in 2**62 < 2**63: one bit of headroom in int64
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class NonFiniteError(FloatingPointError):
    """A NaN or Inf reached the exact summation; it has no fixed-point image."""


def check_rows(rows) -> np.ndarray:
    """Return rows as a (n_chunks, m) float32/float64 array, or raise ValueError saying what it got."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.dtype not in _FLOATS:
        raise ValueError(f"exact summation takes (n_chunks, m) float32/float64 rows, got shape "
                         f"{rows.shape} dtype {rows.dtype}")
    return rows


def local_maxabs(rows) -> np.ndarray:
    """Element-wise max |x| over the rows, (m,), with NaN mapped to Inf so an MPI MAX carries it."""
    rows = check_rows(rows)
    n, m = rows.shape
    out = np.zeros(m, rows.dtype)
    if n == 0:  # a rank without chunks still takes part in the MAX, with zeros
        return out
    work = np.empty((n, _block(n)), rows.dtype)
    for lo, hi in _blocks(n, m):  # column blocks: the work stays in cache, no (n, m) temporary
        w = np.abs(rows[:, lo:hi], out=work[:, :hi - lo])
        np.maximum.reduce(w, axis=0, out=out[lo:hi])  # propagates NaN
    out[np.isnan(out)] = np.inf
    return out


def exponents(maxabs, n_chunks_total) -> np.ndarray:
    """Per-element quantum exponent e (int64, (m,)) for the global max |x| over n_chunks_total chunks."""
    n = operator.index(n_chunks_total)
    if not 0 <= n <= MAX_CHUNKS:
        raise ValueError(f"exact summation takes at most MAX_CHUNKS = 2**20 = {MAX_CHUNKS} chunks per "
                         f"step, got {n}; use larger chunks")
    big = np.abs(np.asarray(maxabs), dtype=np.float64)  # float32 -> float64 is exact
    bad = ~np.isfinite(big)
    if bad.any():
        raise NonFiniteError(f"{int(bad.sum())} of {big.size} elements are NaN or Inf (first at index "
                             f"{int(np.argmax(bad))}); exact summation needs finite values")
    # np.frexp's exponent read from the bits (np.frexp itself is ~10x slower); frexp for 0 and subnormals
    e = (big.view(np.int64) >> 52) - 1022
    small = big < np.finfo(np.float64).tiny
    e[small] = np.frexp(big[small])[1]
    k = max(n - 1, 0).bit_length()  # ceil(log2 n)
    return e - (_BITS - k)


def _pow2(p) -> np.ndarray:
    """Exactly 2.0**p as float64, for integer p in [-1022, 1023], written into the exponent bits."""
    biased = np.add(p, 1023, dtype=np.int64)  # p is an int64 array: no copy beyond this one
    return np.left_shift(biased, 52, out=biased).view(np.float64)


def _pow2_factors(p) -> list[np.ndarray]:
    """One or two float64 arrays whose product is exactly 2.0**p, for |p| < 2045 (past one float's range)."""
    first = np.maximum(np.minimum(p, 1023), -1022)  # np.clip's wrapper cost more than this
    rest = p - first  # nonzero only next to float64's underflow: elements with max |x| < 2**-960
    return [_pow2(first)] + ([_pow2(rest)] if rest.any() else [])


def to_fixed(rows, e) -> np.ndarray:
    """Sum of the chunks rounded to integer multiples of 2**e, as int64 (m,) in units of 2**e.

    rows: (n, m), all |x| <= the maxabs that e came from (else int64 may overflow).
    """
    rows = check_rows(rows)
    n, m = rows.shape
    scales = _pow2_factors(-e)
    total = np.zeros(m, np.int64)
    y = np.empty((n, _block(n)))  # float64 work: float32 chunks scale exactly in it too
    q = np.empty((n, _block(n)), np.int64)
    for lo, hi in _blocks(n, m):  # column blocks of all chunks at once: cache-resident, few calls
        yb, qb = y[:, :hi - lo], q[:, :hi - lo]
        np.multiply(rows[:, lo:hi], scales[0][lo:hi], out=yb)
        for s in scales[1:]:
            yb *= s[lo:hi]  # scaling up from tiny values, exact
        np.rint(yb, out=yb)  # round half to even; yb is exact before it
        np.copyto(qb, yb, casting="unsafe")  # integers below 2**63: exact
        np.add.reduce(qb, axis=0, out=total[lo:hi])  # integer sums: exact in any order
    return total


def _block(n) -> int:
    """Columns per block: about 64 K elements (512 KB of float64) of work for all n rows."""
    return max(256, (1 << 16) // max(n, 1))


def _blocks(n, m):
    step = _block(n)
    return ((lo, min(lo + step, m)) for lo in range(0, m, step))


def from_fixed(total, e, dtype) -> np.ndarray:
    """The float values total * 2**e in dtype, rounded once (int64 -> dtype)."""
    dtype = np.dtype(dtype)
    # the one rounding (int64 -> dtype); integer-valued, so exact in float64
    out = total.astype(dtype).astype(np.float64, copy=False)
    for s in _pow2_factors(e):
        out *= s  # exact unless the result is subnormal
    return out.astype(dtype)


def exact_sum_serial(rows) -> np.ndarray:
    """Sum of the rows of one process, (m,), equal in bits to Comm.exact_sum of the same chunks."""
    rows = check_rows(rows)
    e = exponents(local_maxabs(rows), rows.shape[0])
    return from_fixed(to_fixed(rows, e), e, rows.dtype)
