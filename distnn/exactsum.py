"""Exact, order-free summation through integers (deterministic mode).

Floating-point addition is not associative, so a sum over ranks depends on how the chunks are split
and on the MPI library's reduction order. Integer addition is associative. Two encodings share the
idea: choose, before anything is rounded, a power-of-two quantum q per element that is the same on
every rank; round every chunk's value to a multiple of q; add the multiples as integers.

1. Statistics (loss and metric sums; `exact_sum_serial`, Comm.exact_sum), per element j:

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

2. Gradients (`signal_grid`, `encode`, `decode`). A per-parameter MAX would cost a pass over every
chunk's gradient and a second full-size collective. The proxy-error recursion offers a bound for
free: a chunk of at most c samples contributes G = P_lᵀ I_l to layer l's weights (and Σ_s P_l[s] to
its biases, as if I_l had a column of ones). With a_j >= max |P_l[s, j]| and b_k >= max |I_l[s, k]|
over the rows of ALL chunks (an MPI MAX of per-chunk column maxima: Σ (|O_l| + |I_l|) numbers),
whatever order and fused multiply-adds the BLAS uses (c * u <= 1/2, u the unit roundoff):

    |fl(G_jk)| <= (1 + γ_c) Σ_s |P_sj| |I_sk| <= 2 c a_j b_k < 2**β_jk,
    β_jk = A_j + B_k + h,   A, B the frexp exponents of a, b (B = 1 for biases),  h = ceil(log2 c) + 1.

With k = ceil(log2 n) the quantum is q_jk = 2**(β_jk + k - 51) and the "magic" M_jk = 1.5 * 2**52 * q_jk.
For |x| < 2**β = 2**(51 - k) q, M + x lies in [2**52 q, 2**53 q], where doubles are exactly q apart,
so fl(M + x) = M + rint(x / q) * q (round half to even: M / q is even). Positive doubles are ordered
like their bit patterns, so bits(fl(M + x)) = bits(M) + rint(x / q): ONE float64 addition per element
quantizes a chunk, and adding the bit patterns as integers (wrapping uint64), less n * bits(M), gives
S = Σ_i rint(x_i / q), |S| <= n * 2**(51 - k) <= 2**51, the same integer for every order and split.
Decoding is one integer and one float pass: bits(M) + S is the pattern of M + S * q (still within
[2**52 q, 2**53 q]), and (M + S q) - M = S q exactly (Sterbenz); then one rounding to the net's dtype.

Error: n quantizations of at most q / 2 each; since 2**A < 2a, 2**B < 2b (a, b > 0) and 2**h < 4c,

    |S q - Σ_i x_i| <= n q / 2 = n * 2**(β + k - 52) < n**2 * c * a_j * b_k * 2**-47,

while the floating-point sum of the same c n products (what the default mode computes) may err by up
to γ_cn Σ |P_sj| |I_sk| <= (c n)**2 * a_j * b_k * 2**-53: for c >= 64 the exact sum's bound is the
smaller. For float32 nets the float64 grid is ~2**29 finer than float32 resolution of the bound.
A quantum below 2**-1074 is raised to it (coarser is still exact; M stays a normal number); a bound
so large that M would overflow (|values| near 2**1000) is refused like a NaN.

Non-finite values have no integer image: local_maxabs maps NaN to Inf so that the MPI MAX carries it
to every rank, and exponents() / signal_grid() raise NonFiniteError on every rank alike, before
anything is converted; the trainer turns it into its divergence stop.
"""
import operator

import numpy as np

MAX_CHUNKS = 2**20  # statistics: quantum <= 2**-41 of the largest term; gradients: 2**-31 of the bound
MAX_CHUNK_SIZE = 2**20  # keeps c * u <= 1/2 for float32, which the gradient bound needs
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
    n = _chunk_count(n_chunks_total)
    big = np.abs(np.asarray(maxabs), dtype=np.float64)  # float32 -> float64 is exact
    bad = ~np.isfinite(big)
    if bad.any():
        raise NonFiniteError(f"{int(bad.sum())} of {big.size} elements are NaN or Inf (first at index "
                             f"{int(np.argmax(bad))}); exact summation needs finite values")
    # np.frexp's exponent read from the bits (np.frexp itself is ~10x slower); frexp for 0 and subnormals
    e = (big.view(np.int64) >> 52) - 1022
    small = big < np.finfo(np.float64).tiny
    e[small] = np.frexp(big[small])[1]
    return e - (_BITS - _log2_ceil(n))


def _chunk_count(n_chunks_total) -> int:
    n = operator.index(n_chunks_total)
    if not 0 <= n <= MAX_CHUNKS:
        raise ValueError(f"exact summation takes at most MAX_CHUNKS = 2**20 = {MAX_CHUNKS} chunks per "
                         f"step, got {n}; use larger chunks")
    return n


def _log2_ceil(n) -> int:
    return max(n - 1, 0).bit_length()


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


# ---- gradients: a grid from the layers' signal bounds, one float64 addition per chunk element -----
_HALF = 1 << 51  # the significand bits of 1.5
_LOWEST = (1 << 52) + _HALF  # bits of 1.5 * 2**-1022: the magic of the smallest quantum, 2**-1074


def signal_grid(bounds, shapes, chunk_size, n_chunks_total, out=None) -> np.ndarray:
    """Bits (int64, params layout [W_0, b_0, W_1, ...]) of each parameter's magic M = 1.5 * 2**52 * q.

    bounds: per layer l, the MAX over all chunks of max_s |P_l[s, :]| (|O_l|,) then of max_s
    |I_l[s, :]| (|I_l|,), concatenated (Network.last_signal_maxabs); shapes: (|O_l|, |I_l|) per layer.
    Raises NonFiniteError (the same on every rank) for a NaN/Inf bound or one beyond float64's range.
    """
    c = operator.index(chunk_size)
    if not 1 <= c <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be in [1, {MAX_CHUNK_SIZE}], got {c}")
    offset = _log2_ceil(c) + 1 + _log2_ceil(_chunk_count(n_chunks_total)) - 51  # q = 2**(A + B + offset)
    bounds = np.asarray(bounds, np.float64)
    if not np.isfinite(bounds).all():
        raise NonFiniteError(f"{int((~np.isfinite(bounds)).sum())} of {bounds.size} layer signals are "
                             f"NaN or Inf; exact summation needs finite values")
    exps = np.frexp(bounds)[1].astype(np.int64)  # a few thousand numbers: frexp's cost is nothing
    size = sum(o * i + o for o, i in shapes)
    out = np.empty(size, np.int64) if out is None else out
    at = pos = 0
    for o, i in shapes:
        qa, qb = exps[pos:pos + o] + offset, exps[pos + o:pos + o + i]
        top = int(qa.max()) + max(int(qb.max()), 1)
        if top + 52 > 1023:  # M would not be a finite double
            raise NonFiniteError(f"a gradient bound reaches 2**{top + 51}; exact summation needs "
                                 f"finite values")
        # bits(M_jk) = bits(M for B = 0)_j + B_k << 52: exponents add. uint64, since a row alone
        # may leave the exponent field before B_k brings it back
        row = ((qa + (52 + 1023)).astype(np.uint64) << 52) + _HALF
        w = out[at:at + o * i].view(np.uint64).reshape(o, i)
        np.add(row[:, None], qb.astype(np.uint64)[None, :] << 52, out=w)
        out[at + o * i:at + o * i + o] = (row + (1 << 52)).view(np.int64)  # biases: ones, B = 1
        if int(qa.min()) + min(int(qb.min()), 1) < -1074:  # raise tiny quanta to 2**-1074
            np.maximum(out[at:at + o * i + o], _LOWEST, out=out[at:at + o * i + o])
        at += o * i + o
        pos += o + i
    if pos != bounds.size or at != out.size:
        raise ValueError(f"bounds of size {bounds.size} and a grid of size {out.size} do not fit "
                         f"layers {list(shapes)}")
    return out


def encode(rows, grid, out, work) -> np.ndarray:
    """out (int64, (m,)) = Σ_i rint(rows[i] / q): this rank's chunks on the grid, exactly.

    rows: (n_local, m) chunk gradients bounded as signal_grid assumed; work: float64 (m,) scratch."""
    bits, magic = out.view(np.uint64), grid.view(np.float64)  # uint64: sums wrap, by definition
    if len(rows) == 0:
        out[...] = 0
        return out
    np.add(rows[0], magic, out=out.view(np.float64))  # bits(M) + rint(x / q), one addition
    for r in rows[1:]:
        np.add(r, magic, out=work)
        bits += work.view(np.uint64)
    if len(rows) == 1:
        bits -= grid.view(np.uint64)
    else:
        spare = work.view(np.uint64)
        bits -= np.multiply(grid.view(np.uint64), len(rows), out=spare)  # n bits(M) + S - n bits(M)
    return out


def decode(total, grid, out) -> np.ndarray:
    """out = total * q in out's dtype (one rounding); total (int64 sums from encode) is overwritten."""
    bits = total.view(np.uint64)
    bits += grid.view(np.uint64)  # the bits of M + S q
    return np.subtract(total.view(np.float64), grid.view(np.float64), out=out)  # S q, exactly


def grid_sum_serial(rows, bounds, shapes, chunk_size) -> np.ndarray:
    """The exact gradient sum of one process's chunks, equal in bits to the trainer's over any ranks."""
    rows = check_rows(rows)
    grid = signal_grid(bounds, shapes, chunk_size, len(rows))
    total = encode(rows, grid, np.empty(rows.shape[1], np.int64), np.empty(rows.shape[1]))
    return decode(total, grid, np.empty(rows.shape[1], rows.dtype))


def exact_sum_serial(rows) -> np.ndarray:
    """Sum of the rows of one process, (m,), equal in bits to Comm.exact_sum of the same chunks."""
    rows = check_rows(rows)
    e = exponents(local_maxabs(rows), rows.shape[0])
    return from_fixed(to_fixed(rows, e), e, rows.dtype)
