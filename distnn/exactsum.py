"""Exact, order-free summation for deterministic mode: round to a shared grid, then add in float64.

Floating-point addition is not associative, so a sum over ranks depends on how the chunks are split
and on the MPI library's reduction order. But the sum of two multiples of a power of two q is exact
while it stays within 2**53 q. So, per element, before anything is rounded:

1. choose a quantum q = 2**e, the same on every rank, from a bound 2**E on every chunk's |x| and the
   chunk count n <= 2**k:   e = E + k - 51;
2. round each chunk's x to a multiple of q, with one addition and one subtraction of the "magic"
   M = 1.5 * 2**52 * q: for |x| <= 2**51 q, M + x lies in [2**52 q, 2**53 q], where doubles are
   exactly q apart, so fl(M + x) - M = rint(x / q) * q (round half to even, as M / q is even; the
   subtraction is exact by Sterbenz's lemma);
3. add the rounded terms in float64, on the rank and in an MPI SUM: each is at most 2**(51 - k) q
   in magnitude (|x| < 2**E = 2**(51 - k) q), so any partial sum of at most n <= 2**k of them is at
   most 2**51 q, exactly representable. Every order and every partition gives the same float64:
   bit-identical results on any number of ranks, in the same single collective as the default mode.

Error: n roundings of at most q / 2 each, so |Σ_i rint(x_i / q) q - Σ_i x_i| <= n q / 2
= n * 2**(E + k - 52) < n**2 * 2**(E - 51) (2**k < 2n), plus one rounding to the net's dtype at the end.

Where the bound 2**E comes from:

- Statistics (loss and metric sums, validation; `magic_for`): the element-wise max |x| over ALL
  chunks, an MPI MAX (exact and order-free), with 2**(E-1) <= max < 2**E (np.frexp's exponent). The
  error is then below n**2 * 2**-50 * max |x|: for n = 32 chunks 2**-40 of the largest term.
- Gradients (`SignalGrid`): a per-parameter MAX would cost a pass over every chunk's gradient and a
  second full-size collective. The proxy-error recursion offers a bound for free: a chunk of at most
  c samples contributes G = P_lᵀ I_l to layer l's weights (and Σ_s P_l[s] to its biases, as if I_l
  had a column of ones). With a_j >= max_s |P_l[s, j]| and b_k >= max_s |I_l[s, k]| over the rows of
  ALL chunks (an MPI MAX of per-chunk column maxima: Σ (|O_l| + |I_l|) numbers), whatever order and
  fused multiply-adds the BLAS uses (c u <= 1/2, u the unit roundoff):

      |fl(G_jk)| <= (1 + γ_c) Σ_s |P_sj| |I_sk| <= 2 c a_j b_k < 2**(A_j + B_k + h) = 2**E_jk,

  A, B the frexp exponents of a, b (B = 1 for biases) and h = ceil(log2 c) + 1. Since 2**A <= 2a,
  2**B <= 2b and 2**h < 4c, the error is below n**2 c a_j b_k 2**-47. That is the price of the cheap
  bound: the error scales with c max|P| max|I|, not with Σ_s |P_sj| |I_sk| as a floating-point sum's
  does, so in float64 the grid is coarser than plain summation (for a 20-32-10 net with c = 64,
  n = 32 and one outlier input: median 1e-11 and max 3e-9 absolute error, against 2e-15 and 1e-13
  for the float64 sum of the same chunks). For float32 nets the quantum is
  2**(27 - k) below float32's resolution of the bound, so the sum is as good as float32's own.

Range: a quantum below 2**-1074 is raised to it (coarser is still exact, and M stays a normal
number); a bound so large that M + x could overflow (E + k > 1021: values within a factor 2**(k+3)
of float64's largest) is refused like a NaN. Non-finite values have no grid: local_maxabs maps NaN to
Inf so that an MPI MAX carries it to every rank, and magic_for / SignalGrid raise NonFiniteError on
every rank alike, before anything is rounded; the trainer turns it into its divergence stop. (A
float32 gradient can still overflow to Inf under a finite float64 bound: rounding keeps it Inf or
NaN, the SUM makes it non-finite on every rank, and the trainer's check after the SUM stops there.)

The rounding and the sum are one compiled pass per chunk array (kernels.grid_add): each element is
converted to float64, rounded by M and added to the block's float64 total in cache, and the grid's
magic numbers are built block by block (kernels.grid_magic), never stored whole.
"""
import operator

import numpy as np

from . import kernels
from .network import layout

MAX_CHUNKS = 2**20  # k <= 20: the quantum stays <= 2**-31 of the bound
MAX_CHUNK_SIZE = 2**20  # keeps c u <= 1/2 for float32, which the gradient bound needs
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_BIAS = 1023 + 52  # exponent bias of a double, plus the 52 of M = 1.5 * 2**52 * q
_HALF = 1 << 51  # the significand bits of 1.5
_LOWEST = (1 << 52) + _HALF  # bits of 1.5 * 2**-1022, the magic of the smallest quantum 2**-1074


class NonFiniteError(FloatingPointError):
    """A NaN or Inf (or a value near float64's limit) reached the exact summation; it has no grid."""


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


def _block(n) -> int:
    """Columns per block: about 64 K elements (512 KB of float64) of work for all n rows."""
    return max(16, (1 << 16) // max(n, 1))  # 16: many chunks of few columns stay small too


def _blocks(n, m):
    step = _block(n)
    return ((lo, min(lo + step, m)) for lo in range(0, m, step))


def chunk_bits(n_chunks_total) -> int:
    """k = ceil(log2 n): the headroom n chunks need; ValueError beyond MAX_CHUNKS."""
    n = operator.index(n_chunks_total)
    if not 0 <= n <= MAX_CHUNKS:
        raise ValueError(f"exact summation takes at most MAX_CHUNKS = 2**20 = {MAX_CHUNKS} chunks per "
                         f"step, got {n}; use larger chunks")
    return max(n - 1, 0).bit_length()


def _finite(values, what):
    values = np.asarray(values, np.float64)  # float32 -> float64 is exact
    bad = ~np.isfinite(values)
    if bad.any():
        raise NonFiniteError(f"{int(bad.sum())} of {values.size} {what} are NaN or Inf (first at index "
                             f"{int(np.argmax(bad))}); exact summation needs finite values")
    return values


def _magic_bits(e, k):
    """int64 bits of M = 1.5 * 2**52 * 2**e for int64 exponents e (k: the chunk headroom, for the
    message), quanta below 2**-1074 raised."""
    top = int(e.max(initial=-1074))
    if top + 53 > 1023:  # M + x may reach 2**53 q: that must be finite too
        raise NonFiniteError(f"a value reaches 2**{top + 51 - k}, too close to float64's largest for "
                             f"exact summation")
    return ((np.maximum(e, -1074) + _BIAS) << 52) + _HALF


def magic_for(maxabs, n_chunks_total) -> np.ndarray:
    """float64 magic M per element for chunks bounded element-wise by maxabs (the MAX over all)."""
    k = chunk_bits(n_chunks_total)
    e = np.frexp(_finite(maxabs, "elements"))[1].astype(np.int64) + (k - 51)
    return _magic_bits(e, k).view(np.float64)


class SignalGrid:
    """The gradient grid: each parameter's magic M = 1.5 * 2**52 * q, params layout [W_0, b_0, ...].

    Built from bounds: per layer l, the MAX over all chunks of max_s |P_l[s, :]| (|O_l|,) then of
    max_s |I_l[s, :]| (|I_l|,), concatenated (Network.last_signal_maxabs); shapes: (|O_l|, |I_l|).
    Raises NonFiniteError (the same on every rank) for a NaN/Inf bound or one beyond float64's range.
    M_jk is never stored whole: it is an outer sum of exponents, so `encode` rebuilds it block by
    block in cache, right where it rounds the chunks.
    """

    BLOCK = 1 << 15  # parameters per block: 256 KiB of float64 magic, as much work

    def __init__(self, bounds, shapes, chunk_size, n_chunks_total):
        c = operator.index(chunk_size)
        if not 1 <= c <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be in [1, {MAX_CHUNK_SIZE}], got {c}")
        k = chunk_bits(n_chunks_total)
        offset = (c - 1).bit_length() + 1 + k - 51  # e = A + B + offset
        exps = np.frexp(_finite(bounds, "layer signals"))[1].astype(np.int64)  # a few thousand
        if exps.size != sum(o + i for o, i in shapes):
            raise ValueError(f"{exps.size} bounds do not fit layers {list(shapes)}")
        self.layers, pos = [], 0
        for o, i in shapes:
            a = exps[pos:pos + o] + offset
            b = np.append(exps[pos + o:pos + o + i], 1)  # the biases' column of ones: B = 1
            pos += o + i
            top = int(a.max()) + int(b.max())
            if top + 53 > 1023:  # M + x may reach 2**53 q: that must be finite too
                raise NonFiniteError(f"a gradient bound reaches 2**{top + 51 - k}, too close to "
                                     f"float64's largest for exact summation")
            # bits(M_jk) = bits(M)(A_j) + B_k << 52: exponents add. A row's bits alone may leave
            # the exponent field (below 0) before B_k brings them back: int64 holds them all.
            # A quantum below 2**-1074 is raised to it by grid_magic, block by block.
            row = ((a + _BIAS) << 52) + _HALF
            self.layers.append((row, b << 52))
        slots = layout(shapes)
        self.size = slots[-1][1].stop if slots else 0
        self.spans = list(self._spans(slots, shapes))

    def _spans(self, slots, shapes):
        """(lo, hi, layer, j, k) per block: weight rows j..k of a layer, or its biases (j = None)."""
        for layer, ((weights, biases), (o, i)) in enumerate(zip(slots, shapes)):
            step = max(1, self.BLOCK // i)
            for j in range(0, o, step):
                k = min(o, j + step)
                yield weights.start + j * i, weights.start + k * i, layer, j, k
            yield biases.start, biases.stop, layer, None, None

    def blocks(self, magic, first=0, last=None):
        """Yield (lo, hi, M[lo:hi]) for the blocks spans[first:last] (all by default), each M block
        written into magic (scratch, `width` long)."""
        for lo, hi, layer, j, k in self.spans[first:last]:
            row, col = self.layers[layer]
            if j is None:  # the biases: their column of ones
                kernels.grid_magic(row, col[-1:], _LOWEST, magic)
            else:
                kernels.grid_magic(row[j:k], col[:-1], _LOWEST, magic)
            yield lo, hi, magic[:hi - lo]

    def owner_cuts(self, ranks):
        """(blocks, parameters): the first block and first parameter each of `ranks` ranks sums
        in a shared-memory grid sum (Comm.grid_sum), as bounds lists of ranks + 1 each. The
        same for every grid of these shapes: the blocks do not depend on the signals."""
        blocks = [len(self.spans) * p // ranks for p in range(ranks + 1)]
        return blocks, [self.spans[b][0] for b in blocks[:-1]] + [self.size]

    @property
    def width(self):
        """The longest block: the scratch `blocks` and `encode` need."""
        return max(hi - lo for lo, hi, *_ in self.spans)

    def magic(self) -> np.ndarray:
        """All of M as one float64 vector (for inspection: `encode` never builds it)."""
        out = np.empty(self.size)
        for lo, hi, m in self.blocks(np.empty(self.width)):
            out[lo:hi] = m
        return out

    def encode(self, rows, out) -> np.ndarray:
        """out (float64, (size,)) = Σ_i rint(rows[i] / q) q over this rank's chunk gradients, exactly."""
        return self.sum_into([check_rows(rows)], out)

    def sum_into(self, chunks, out, first=0, last=None, scratch=None) -> np.ndarray:
        """out[lo:hi] = Σ rint(row[lo:hi] / q) q over the rows of every (n_i, size) array in
        `chunks`, exact in float64 and rounded once to out's dtype, for the blocks spans[first:last]
        (all by default). The float64 sum of a block never leaves the cache: one pass over each
        chunk array's block adds its rows. scratch: (>= 2, width) float64, or None to allocate it."""
        magic, total = np.empty((2, self.width)) if scratch is None else scratch[:2]
        chunks = [np.ascontiguousarray(rows) for rows in chunks]
        for lo, hi, m in self.blocks(magic, first, last):
            block = total[:hi - lo]
            block[:] = 0
            for rows in chunks:  # exact: any order of the arrays gives these bits
                kernels.grid_add(rows, len(rows), lo, m, block, False)
            out[lo:hi] = block
        return out


def round_to_grid(x, magic, out) -> np.ndarray:
    """out = rint(x / q) * q in float64 (exact), for |x| <= 2**51 q.   x, magic, out (m,)."""
    return encode(np.reshape(x, (1, -1)), magic, out)


def encode(rows, magic, out) -> np.ndarray:
    """out (float64, (m,)) = Σ_i rint(rows[i] / q) q: chunks on the grid, added exactly, in one
    pass per row (kernels.grid_add). rows: (n_local, m), bounded as the magic assumed; magic
    float64 (m,)."""
    rows = np.ascontiguousarray(rows)
    if rows.ndim != 2:
        rows = rows.reshape(len(rows), -1)
    kernels.grid_add(rows, len(rows), 0, np.ascontiguousarray(magic, np.float64), out, True)
    return out


def exact_sum_serial(rows) -> np.ndarray:
    """Sum of the rows of one process, (m,), equal in bits to Comm.exact_sum of the same chunks."""
    rows = check_rows(rows)
    magic = magic_for(local_maxabs(rows), len(rows))
    total = encode(rows, magic, np.empty(rows.shape[1]))
    return total.astype(rows.dtype)


def grid_sum_serial(rows, bounds, shapes, chunk_size) -> np.ndarray:
    """The exact gradient sum of one process's chunks, equal in bits to the trainer's over any ranks."""
    rows = check_rows(rows)
    grid = SignalGrid(bounds, shapes, chunk_size, len(rows))
    return grid.encode(rows, np.empty(rows.shape[1])).astype(rows.dtype)
