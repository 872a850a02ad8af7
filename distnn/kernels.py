"""Compiled element-wise kernels (numba): the passes around the GEMMs, each fused into one loop.

BLAS keeps the matrix products; everything element-wise that runs every step is here, one small
`@njit` function per job, with its formula and shapes in its docstring and a numpy twin in
tests/test_kernels.py. Shapes: N samples, H units of a hidden layer, K outputs; the output layer's
arrays are class-major (K, N) (see network._Buffers), hidden ones (N, H), all C-contiguous.

- forward, per activation A: `<A>_forward(z, b)`: Z = A(Z + b) in place, the bias add fused;
- backward, per activation: `<A>_backward(p, o, gb)`: P *= A'(O) through the output O, and the
  next layer's bias gradient gb = Σ_n P[n] in the same pass (`colsum` where A' == 1);
- the output pass, per family: `<link>_output(zt, y, pt, divisor, gb) -> (loss, correct)`:
  P_L = (mean(Z_L) − Y) / divisor, the loss sum (float64), the correct count and the output bias
  gradient Σ_n P_L[:, n], in one pass over the logits;
- the optimizers' updates as one pass over the parameter vector (`sgd_update`, `adam_update`);
- DP-SGD: per-sample squared gradient norms (`add_sample_sq_norms`, and through time
  `add_sequence_sq_norms`), clip factors, rows scaled with their bias sum (`scale_rows`);
- the gradient's squared norm and finiteness (`sum_squares`, `all_finite`);
- DP-SGD's Gaussian noise: `add_normal`, Box–Muller on Philox4x32-10, each value a function of
  (key, step, parameter index), libm-free so that it vectorizes (its twins: tests/test_noise.py);
- deterministic mode: column maxima |P|, |I| (`colmax_abs` on the float bits, `rowmax_abs`) and the rounding onto
  the grid plus the exact float64 sum, one pass per chunk array (`grid_magic`, `grid_add`).

No `fastmath`, on purpose: the exact sum's grid relies on IEEE rounding of each addition (no
reassociation, no fused multiply-add), and overflow safety on exact max shifts and NaN/Inf
propagating as numpy's. Without it, a kernel whose operations run in numpy's order gives numpy's
bits (tested); exp, log1p and tanh come from another math library, equal to round-off.

Conventions that keep one compiled version per dtype: arrays C-contiguous, scalars passed in the
arrays' dtype (`dtype.type(x)`), so float32 arithmetic stays float32 as in numpy. Division by zero
gives inf or NaN as in numpy (error_model="numpy"; it also lets the loops vectorize). Reductions whose
order matters run serially, or in a fixed interleaving independent of any thread count;
kernels release the GIL (`nogil`), so threads.run_parallel can run slices of a long vector at once.

Compilation is lazy (the first call for a dtype) and cached on disk (`cache=True`): in
`__pycache__` beside this file, or, where that is read-only, numba's user cache directory;
NUMBA_CACHE_DIR overrides both. Concurrent first runs are safe: numba writes each cache file under
a temporary name and renames it.
"""
import math

import numpy as np
from numba import njit

LEAKY_SLOPE = 0.01  # leaky_relu's slope below 0

jit = njit(cache=True, nogil=True, error_model="numpy")  # no fastmath: see the module docstring


# ============================================================================ activations, forward

@jit
def identity_forward(z, b):
    """Z = Z + b.   z (N, H) in place, b (H,)."""
    n, h = z.shape
    for i in range(n):
        for j in range(h):
            z[i, j] += b[j]


@jit
def relu_forward(z, b):
    """Z = max(Z + b, 0), NaN kept.   z (N, H) in place, b (H,)."""
    n, h = z.shape
    zero = z.dtype.type(0)
    for i in range(n):
        for j in range(h):
            v = z[i, j] + b[j]
            z[i, j] = zero if v < zero else v


@jit
def leaky_relu_forward(z, b):
    """Z = V if V >= 0 else s V, V = Z + b, s = LEAKY_SLOPE.   z (N, H) in place, b (H,)."""
    n, h = z.shape
    zero, slope = z.dtype.type(0), z.dtype.type(LEAKY_SLOPE)
    for i in range(n):
        for j in range(h):
            v = z[i, j] + b[j]
            z[i, j] = v * slope if v < zero else v


@jit
def tanh_forward(z, b):
    """Z = tanh(Z + b).   z (N, H) in place, b (H,)."""
    n, h = z.shape
    for i in range(n):
        for j in range(h):
            z[i, j] = math.tanh(z[i, j] + b[j])


@jit
def sigmoid_forward(z, b):
    """Z = sigmoid(Z + b) = 1 / (1 + e^-(Z + b)), stable (exp of -|·| only).   z (N, H), b (H,)."""
    n, h = z.shape
    one = z.dtype.type(1)
    for i in range(n):
        for j in range(h):
            v = z[i, j] + b[j]
            e = math.exp(-abs(v))
            s = e / (one + e)
            z[i, j] = one - s if v >= 0 else s


@jit
def softplus_forward(z, b):
    """Z = log(1 + e^V) = max(V, 0) + log1p(e^-|V|), V = Z + b, finite for finite V.   z (N, H), b (H,)."""
    n, h = z.shape
    zero = z.dtype.type(0)
    for i in range(n):
        for j in range(h):
            v = z[i, j] + b[j]
            z[i, j] = math.log1p(math.exp(-abs(v))) + (v if v > zero else zero)


# ============================================================================ activations, backward

@jit
def colsum(p, gb):
    """gb = Σ_n P[n] (a bias gradient), summed over n in order.   p (N, H), gb (H,)."""
    n, h = p.shape
    gb[:] = 0
    for i in range(n):
        for j in range(h):
            gb[j] += p[i, j]


@jit
def relu_backward(p, o, gb):
    """P = P ∘ [O > 0] (NaN in P kept), gb = Σ_n P[n].   p, o (N, H), gb (H,)."""
    n, h = p.shape
    zero, one = p.dtype.type(0), p.dtype.type(1)
    gb[:] = 0
    for i in range(n):
        for j in range(h):
            v = p[i, j] * (one if o[i, j] > zero else zero)
            p[i, j] = v
            gb[j] += v


@jit
def leaky_relu_backward(p, o, gb):
    """P = P ∘ (1 if O > 0 else LEAKY_SLOPE), gb = Σ_n P[n].   p, o (N, H), gb (H,)."""
    n, h = p.shape
    zero, one, slope = p.dtype.type(0), p.dtype.type(1), p.dtype.type(LEAKY_SLOPE)
    gb[:] = 0
    for i in range(n):
        for j in range(h):
            v = p[i, j] * (one if o[i, j] > zero else slope)
            p[i, j] = v
            gb[j] += v


@jit
def tanh_backward(p, o, gb):
    """P = P ∘ (1 − O²), gb = Σ_n P[n].   p, o (N, H), gb (H,)."""
    n, h = p.shape
    one = p.dtype.type(1)
    gb[:] = 0
    for i in range(n):
        for j in range(h):
            v = p[i, j] * (one - o[i, j] * o[i, j])
            p[i, j] = v
            gb[j] += v


@jit
def sigmoid_backward(p, o, gb):
    """P = P ∘ (1 − O) O, gb = Σ_n P[n].   p, o (N, H), gb (H,)."""
    n, h = p.shape
    one = p.dtype.type(1)
    gb[:] = 0
    for i in range(n):
        for j in range(h):
            v = p[i, j] * ((one - o[i, j]) * o[i, j])
            p[i, j] = v
            gb[j] += v


@jit
def softplus_backward(p, o, gb):
    """P = P ∘ (1 − e^-O) (softplus' = sigmoid = 1 − e^-softplus), gb = Σ_n P[n].   p, o (N, H)."""
    n, h = p.shape
    gb[:] = 0
    for i in range(n):
        for j in range(h):
            v = p[i, j] * -math.expm1(-o[i, j])
            p[i, j] = v
            gb[j] += v


# ============================================================================ the output pass

@jit
def add_rows(zt, b):
    """Z_L += b on the class-major logits: zt[k] += b[k].   zt (K, N), b (K,)."""
    k, n = zt.shape
    for c in range(k):
        for i in range(n):
            zt[c, i] += b[c]


@jit
def softmax_output(zt, labels, pt, divisor, gb):
    """Multinomial: with m = max_k z, s = Σ_k e^(z_k − m) per sample,
    P_L = (e^(z − m) / s − onehot(y)) / divisor, loss = Σ_n log s − (z_y − m) (float64),
    correct = #{argmax z = y} (first maximum), gb = Σ_n P_L[:, n].
    zt, pt (K, N) class-major; labels (N,) ints; divisor in the dtype; gb (K,). Returns (loss, correct).
    The loops run along the samples (contiguous), so all but exp and log vectorize."""
    k, n = zt.shape
    top, best = zt[0].copy(), np.zeros(n, np.int64)  # (N,): the max logit and its class
    for c in range(1, k):
        for i in range(n):
            v = zt[c, i]
            larger = v > top[i]  # the first maximum, as numpy's argmax
            top[i] = v if larger else top[i]
            best[i] = c if larger else best[i]
    s = np.zeros(n, zt.dtype)
    for c in range(k):
        for i in range(n):
            e = math.exp(zt[c, i] - top[i])  # exact shift: the largest becomes e^0 = 1, no overflow
            pt[c, i] = e
            s[i] += e
    loss, correct = 0.0, 0
    for i in range(n):
        y = labels[i]
        correct += best[i] == y
        loss += np.float64(math.log(s[i])) - np.float64(zt[y, i] - top[i])  # log s in [0, log K]
    one, zero = zt.dtype.type(1), zt.dtype.type(0)
    for c in range(k):
        total = zero
        for i in range(n):
            v = (pt[c, i] / s[i] - (one if labels[i] == c else zero)) / divisor  # x - 0 is x
            pt[c, i] = v
            total += v
        gb[c] = total
    return loss, correct


@jit
def sigmoid_output(zt, y, pt, divisor, gb):
    """Bernoulli: P_L = (sigmoid(z) − y) / divisor, loss = Σ softplus(z) − y z (float64),
    correct = #{(z > 0) = (y > 1/2)}, gb = Σ_n P_L[:, n].
    zt, pt (K, N) class-major; y (N, K) 0/1; divisor in the dtype; gb (K,). Returns (loss, correct)."""
    k, n = zt.shape
    zero, one = zt.dtype.type(0), zt.dtype.type(1)
    half = y.dtype.type(0.5)
    loss, correct = 0.0, 0
    for c in range(k):
        for i in range(n):
            v, t = zt[c, i], y[i, c]
            e = math.exp(-abs(v))  # in (0, 1]
            s = e / (one + e)  # sigmoid(-|v|)
            mean = one - s if v >= zero else s
            pt[c, i] = (mean - t) / divisor
            softplus = math.log1p(e) + (v if v > zero else zero)
            loss += np.float64(softplus - t * v)
            correct += (v > zero) == (t > half)
    colsum_rows(pt, gb)
    return loss, correct


@jit
def identity_output(zt, y, pt, divisor, gb):
    """Gaussian: P_L = (z − y) / divisor, loss = ½ Σ (z − y)² (squares in float64), no correct
    count (0), gb = Σ_n P_L[:, n].   zt, pt (K, N); y (N, K); gb (K,). Returns (loss, 0)."""
    k, n = zt.shape
    loss = 0.0
    for c in range(k):
        for i in range(n):
            r = zt[c, i] - y[i, c]
            pt[c, i] = r / divisor
            loss += np.float64(r) * np.float64(r)
    colsum_rows(pt, gb)
    return 0.5 * loss, 0


@jit
def exp_output(zt, y, pt, divisor, gb):
    """Poisson: P_L = (e^z − y) / divisor, loss = Σ e^z − y z (float64; inf when e^z overflows),
    no correct count (0), gb = Σ_n P_L[:, n].   zt, pt (K, N); y (N, K); gb (K,). Returns (loss, 0)."""
    k, n = zt.shape
    loss = 0.0
    for c in range(k):
        for i in range(n):
            v, t = zt[c, i], y[i, c]
            rate = math.exp(v)
            pt[c, i] = (rate - t) / divisor
            loss += np.float64(rate - t * v)
    colsum_rows(pt, gb)
    return loss, 0


# ============================================================================ DP-SGD: per-sample clipping

@jit
def add_sample_sq_norms(p, inp, sq):
    """sq[n] += ‖P[n]‖² (‖I[n]‖² + 1): sample n's squared gradient norm of one layer (weights and
    bias; ‖P ⊗ I‖ = ‖P‖ ‖I‖), in float64.   p (N, H) any layout, inp (N, D), sq (N,) float64."""
    n, h = p.shape
    d = inp.shape[1]
    for i in range(n):
        sp = 0.0
        for j in range(h):
            sp += np.float64(p[i, j]) * np.float64(p[i, j])
        si = 1.0
        for k in range(d):
            si += np.float64(inp[i, k]) * np.float64(inp[i, k])
        sq[i] += sp * si


@jit
def gram_block(n, t):
    """Sequences add_sequence_sq_norms takes at once for N sequences of T steps (its Gram
    scratch, 2 T² of them, at most 16 MiB)."""
    return max(1, min(n, 64, (1 << 20) // (t * t)))


def sequence_scratch(n, t, h, d):
    """add_sequence_sq_norms's float64 scratch for N sequences of T steps, widths H, D: four arrays
    (one buffer cut in four is slower: the compiler cannot tell its parts apart)."""
    b = gram_block(n, t)
    return (np.empty((t, h, b)), np.empty((t, d, b)), np.empty((t, t, b)), np.empty((t, t, b)))


@jit
def add_sequence_sq_norms(p, inp, lengths, sq, scratch):
    """sq[n] += Σ_{t,s < len_n} (P[t,n]·P[s,n]) (1 + I[t,n]·I[s,n]): sequence n's squared gradient
    norm of one layer shared through time, whose weight gradient Σ_t P[t,n] ⊗ I[t,n] has the
    squared norm Σ_{t,s} (P_t·P_s)(I_t·I_s) and bias gradient Σ_t P[t,n] the Σ_{t,s} P_t·P_s.
    p (T, N, H), inp (T, N, D), lengths (N,) ints, sq (N,) float64, scratch
    sequence_scratch(N, T, H, D) (the caller's, kept: fresh pages every call cost more than the
    products at T = 32).

    The T×T Gram products in float64, each pair once (t > s counted twice): every dot product
    in order of its index, from 0 (P) or 1 (I), then the pairs in order of (t, s): the bits of
    the plain loops. Blocks of gram_block sequences are copied to float64 (T, width, block)
    scratch, steps beyond a length as 0, so that the innermost loop runs over the block's
    sequences: independent sums, contiguous (0.21 against 0.40 ms for 64 sequences of 8 steps
    at widths 128 and 72)."""
    t_all, n, h = p.shape
    d = inp.shape[2]
    blk = gram_block(n, t_all)
    xp, xi, gp, gi = scratch  # (T, H, block), (T, D, block), (T, T, block) twice
    for i0 in range(0, n, blk):
        nb = min(blk, n - i0)
        m = 0
        for b in range(nb):
            m = max(m, lengths[i0 + b])
        for t in range(m):
            for b in range(nb):
                alive = t < lengths[i0 + b]
                for j in range(h):
                    xp[t, j, b] = p[t, i0 + b, j] if alive else 0.0
                for k in range(d):
                    xi[t, k, b] = inp[t, i0 + b, k] if alive else 0.0
        for t in range(m):
            for s in range(t + 1):
                pp, ii = gp[t, s], gi[t, s]  # (block,)
                pt, ps, it, is_ = xp[t], xp[s], xi[t], xi[s]
                for b in range(nb):
                    pp[b] = 0.0
                    ii[b] = 1.0
                for j in range(h):
                    for b in range(nb):
                        pp[b] += pt[j, b] * ps[j, b]
                for k in range(d):
                    for b in range(nb):
                        ii[b] += it[k, b] * is_[k, b]
        for b in range(nb):
            total = 0.0
            for t in range(lengths[i0 + b]):
                for s in range(t + 1):
                    v = gp[t, s, b] * gi[t, s, b]
                    total += v if s == t else 2.0 * v
            sq[i0 + b] += total


@jit
def clip_scales(sq, clip, divisor, out):
    """out[n] = min(1, C / ‖g_n‖) / divisor from sq[n] = ‖g_n‖² (float64; NaN stays NaN's
    business: the factor is then 1/divisor and the NaN in P propagates).   sq, out (N,)."""
    c2 = clip * clip
    for i in range(sq.shape[0]):
        s = sq[i]
        out[i] = (clip / math.sqrt(s) if s > c2 else 1.0) / divisor


@jit
def scale_rows(p, c, gb):
    """P[n] *= c[n], gb = Σ_n P[n] (in order of n).   p (N, H), c (N,), gb (H,)."""
    n, h = p.shape
    gb[:] = 0
    for i in range(n):
        ci = c[i]
        for j in range(h):
            v = p[i, j] * ci
            p[i, j] = v
            gb[j] += v


@jit
def scale_cols(pt, c, gb):
    """Class-major P: pt[k, n] *= c[n], gb[k] = Σ_n pt[k, n] (in order of n).   pt (K, N), c (N,),
    gb (K,)."""
    k, n = pt.shape
    for j in range(k):
        s = pt.dtype.type(0)
        for i in range(n):
            v = pt[j, i] * c[i]
            pt[j, i] = v
            s += v
        gb[j] = s


@jit
def add_scaled(g, z, a):
    """g += a z (DP noise onto a gradient share), one pass.   g, z (n,), a in their dtype."""
    for i in range(g.shape[0]):
        g[i] += a * z[i]


@jit
def colsum_rows(pt, gb):
    """gb[k] = Σ_n pt[k, n], in order of n: a class-major bias gradient.   pt (K, N), gb (K,)."""
    k, n = pt.shape
    for c in range(k):
        s = pt.dtype.type(0)
        for i in range(n):
            s += pt[c, i]
        gb[c] = s


@jit
def softmax_mean(zt, out):
    """out = softmax(z) per sample, max-shifted: e^(z − m) / Σ e^(z − m).   zt, out (K, N)."""
    k, n = zt.shape
    for i in range(n):
        m = zt[0, i]
        for c in range(1, k):
            if zt[c, i] > m:
                m = zt[c, i]
        s = zt.dtype.type(0)
        for c in range(k):
            e = math.exp(zt[c, i] - m)
            out[c, i] = e
            s += e
        for c in range(k):
            out[c, i] = out[c, i] / s


@jit
def sigmoid_mean(zt, out):
    """out = sigmoid(z), stable (exp of -|z| only).   zt, out (K, N)."""
    k, n = zt.shape
    one = zt.dtype.type(1)
    for c in range(k):
        for i in range(n):
            v = zt[c, i]
            e = math.exp(-abs(v))
            s = e / (one + e)
            out[c, i] = one - s if v >= 0 else s


@jit
def exp_mean(zt, out):
    """out = e^z (inf where it overflows).   zt, out (K, N)."""
    k, n = zt.shape
    for c in range(k):
        for i in range(n):
            out[c, i] = math.exp(zt[c, i])


# ============================================================================ optimizer updates

@jit
def sgd_update(p, g, v, lr, momentum, weight_decay, nesterov):
    """SGD, torch's form, in the dtype of p and in numpy's operation order:
    g' = g + wd p;  v = mu v + g';  u = g' + mu v (nesterov) or v (or g' without momentum);
    p = p − lr u.   p, g, v (n,) (v unused and may be empty when mu = 0); scalars in p's dtype."""
    zero = p.dtype.type(0)
    for i in range(p.size):
        gi = g[i]
        if weight_decay != zero:
            gi = gi + p[i] * weight_decay
        if momentum != zero:
            vi = v[i] * momentum + gi
            v[i] = vi
            gi = gi + vi * momentum if nesterov else vi
        p[i] = p[i] - gi * lr


@jit
def adam_update(p, g, m, v, lr_t, beta1, beta2, one_b1, one_b2, root_c2, eps, weight_decay, keep):
    """Adam / AdamW in the dtype of p and in numpy's operation order:
    p = keep p (AdamW's decoupled decay, keep = 1 − lr wd; else 1 and skipped);
    g' = g + wd p (Adam's L2 decay; wd = 0 for AdamW);  v = b2 v + (1 − b2) g'²;
    m = b1 m + (1 − b1) g';  p = p − lr_t m / (√v / √(1 − b2^t) + eps), lr_t = lr / (1 − b1^t).
    p, g, m, v (n,); scalars in p's dtype (one_b1 = 1 − b1, root_c2 = √(1 − b2^t) as numpy casts them)."""
    zero, one = p.dtype.type(0), p.dtype.type(1)
    for i in range(p.size):
        pi, gi = p[i], g[i]
        if keep != one:
            pi = pi * keep
        if weight_decay != zero:
            gi = gi + pi * weight_decay
        vi = v[i] * beta2 + (gi * gi) * one_b2
        mi = m[i] * beta1 + gi * one_b1
        v[i], m[i] = vi, mi
        p[i] = pi - (mi / (math.sqrt(vi) / root_c2 + eps)) * lr_t


# ============================================================================ norms and checks

@jit
def sum_squares(x, scale):
    """Σ (scale x_i)² in float64: eight interleaved partial sums (element i in sum i mod 8), added
    pairwise at the end, then the tail: a fixed order, the same bits for the same x whatever the
    threads.   x (n,); scale float64."""
    n = x.size
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    full = n - n % 8
    for i in range(0, full, 8):
        t0, t1 = np.float64(x[i]) * scale, np.float64(x[i + 1]) * scale
        t2, t3 = np.float64(x[i + 2]) * scale, np.float64(x[i + 3]) * scale
        t4, t5 = np.float64(x[i + 4]) * scale, np.float64(x[i + 5]) * scale
        t6, t7 = np.float64(x[i + 6]) * scale, np.float64(x[i + 7]) * scale
        a0 += t0 * t0
        a1 += t1 * t1
        a2 += t2 * t2
        a3 += t3 * t3
        a4 += t4 * t4
        a5 += t5 * t5
        a6 += t6 * t6
        a7 += t7 * t7
    total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(full, n):
        t = np.float64(x[i]) * scale
        total += t * t
    return total


@jit
def all_finite(x):
    """True when no x_i is NaN or ±Inf (x − x is 0 exactly for finite x).   x (n,)."""
    zero = x.dtype.type(0)
    bad = False
    for i in range(x.size):
        bad |= (x[i] - x[i]) != zero
    return not bad


# ============================================================================ deterministic mode

@jit
def colmax_abs(bits, out, mask):
    """out[j] = max(out[j], max_n |a[n, j]|) on the IEEE bits of a float array a and of out
    (a.view(int32 or int64), mask = the bits without the sign: 0x7fff...): a non-negative float's
    bits order like its value, and a NaN's lie above Inf's, so a NaN propagates. The integer max
    vectorizes, where a float one that must keep NaN does not.   bits (N, M), out (M,) ints."""
    n, m = bits.shape
    for i in range(n):
        for j in range(m):
            v, o = bits[i, j] & mask, out[j]
            out[j] = v if v > o else o


@jit
def rowmax_abs(at, out):
    """out[k] = max(out[k], max_n |at[k, n]|), NaN propagated.   at (K, N) class-major, out (K,)."""
    k, n = at.shape
    for c in range(k):
        top = out[c]
        for i in range(n):
            v = abs(at[c, i])
            if v > top or v != v:
                top = v
        out[c] = top


@jit
def grid_magic(row_bits, col_bits, lowest, magic):
    """The grid's magic numbers of a block of weight rows (or of biases, one column):
    bits(M[r, c]) = max(row_bits[r] + col_bits[c], lowest), exponents adding in the bits; lowest
    is the magic of the smallest quantum 2^-1074, to which smaller quanta are raised.
    row_bits (R,), col_bits (C,) int64; magic (>= R C,) float64, written through its int64 bits."""
    bits = magic.view(np.int64)
    r_n, c_n = row_bits.size, col_bits.size
    for r in range(r_n):
        for c in range(c_n):
            u = row_bits[r] + col_bits[c]
            bits[r * c_n + c] = u if u > lowest else lowest


@jit
def grid_add(rows, count, lo, magic, total, first):
    """total (+)= Σ_{i < count} ((rows[i, lo + e] + M_e) − M_e), e < len(total), all in float64:
    each chunk rounded to its multiple of the quantum q, M = 1.5 · 2^52 q, and added exactly (the
    partial sums are multiples of q within 2^53 q). first: total is assigned, not added to.
    rows (n, m) float32/float64; magic, total (≥ width,) float64, width = len(total)."""
    width = total.size
    if first:
        total[:] = 0
    for i in range(count):
        for e in range(width):
            mg = magic[e]
            total[e] += (np.float64(rows[i, lo + e]) + mg) - mg


# ============================================================ DP noise: Philox + Box–Muller
# Counter-based Gaussians (privacy.add_noise): every value a pure function of (key, step, index).
# Philox4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"; passes
# TestU01's BigCrush): 10 rounds of two 32x32->64-bit products, a bijection of the 128-bit counter
# for each 64-bit key. Words are uint32 and each product a widened uint32: LLVM then sees
# 32x32->64 multiplies and vectorizes a loop of blocks (vpmuludq).
_PM0, _PM1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Random123's multipliers
_PW0, _PW1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)  # its Weyl key increments
_S32 = np.uint64(32)


@njit(inline="always")
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter (c0..c3) under key (k0, k1), all uint32 -> 4 uint32."""
    for _ in range(10):
        p0 = _PM0 * np.uint64(c0)
        p1 = _PM1 * np.uint64(c2)
        c0, c1, c2, c3 = (np.uint32(p1 >> _S32) ^ c1 ^ k0, np.uint32(p1),
                          np.uint32(p0 >> _S32) ^ c3 ^ k1, np.uint32(p0))
        k0 = np.uint32(k0 + _PW0)
        k1 = np.uint32(k1 + _PW1)
    return c0, c1, c2, c3


_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_HALF_PI = 1.5707963267948966


@njit(inline="always")
def _log_unit(u):
    """ln u for u in [2^-64, 1], without libm (so that loops of it vectorize): u = m 2^-e, e by a
    branch-free binary search (exact power-of-two scalings), m in [√½, √2), then
    ln m = 2 atanh(s) = 2 Σ s^(2k+1) / (2k+1), s = (m − 1)/(m + 1), |s| <= 0.172: 11 terms leave
    < 1e-17 relative. Relative error ~1e-16 (tested against numpy's log)."""
    e = 0.0
    small = u < 2.3283064365386963e-10  # 2^-32
    u, e = (u * 4294967296.0, e + 32.0) if small else (u, e)
    small = u < 1.52587890625e-05  # 2^-16
    u, e = (u * 65536.0, e + 16.0) if small else (u, e)
    small = u < 0.00390625  # 2^-8
    u, e = (u * 256.0, e + 8.0) if small else (u, e)
    small = u < 0.0625
    u, e = (u * 16.0, e + 4.0) if small else (u, e)
    small = u < 0.25
    u, e = (u * 4.0, e + 2.0) if small else (u, e)
    small = u < 0.5
    u, e = (u * 2.0, e + 1.0) if small else (u, e)
    small = u < _SQRT_HALF
    u, e = (u * 2.0, e + 1.0) if small else (u, e)
    s = (u - 1.0) / (u + 1.0)
    s2 = s * s
    p = 1 / 21
    p = p * s2 + 1 / 19
    p = p * s2 + 1 / 17
    p = p * s2 + 1 / 15
    p = p * s2 + 1 / 13
    p = p * s2 + 1 / 11
    p = p * s2 + 1 / 9
    p = p * s2 + 1 / 7
    p = p * s2 + 1 / 5
    p = p * s2 + 1 / 3
    p = p * s2 + 1.0
    return 2.0 * s * p - e * _LN2


@njit(inline="always")
def _sincos_quarter(t):
    """(cos, sin) of t π/2 for t in [0, 1]: reflected to φ <= π/4 and the Taylor series to φ^17
    and φ^18 (remainders < 1e-19), Horner in φ² with the factorials' ratios."""
    hi = t > 0.5
    phi = (1.0 - t if hi else t) * _HALF_PI
    p2 = phi * phi
    s = 1.0 - p2 * (1 / 272)  # sin: φ(1 − φ²/(2·3)(1 − φ²/(4·5)(... (1 − φ²/(16·17))))
    s = 1.0 - p2 * (1 / 210) * s
    s = 1.0 - p2 * (1 / 156) * s
    s = 1.0 - p2 * (1 / 110) * s
    s = 1.0 - p2 * (1 / 72) * s
    s = 1.0 - p2 * (1 / 42) * s
    s = 1.0 - p2 * (1 / 20) * s
    s = 1.0 - p2 * (1 / 6) * s
    c = 1.0 - p2 * (1 / 306)  # cos: 1 − φ²/(1·2)(1 − φ²/(3·4)(... (1 − φ²/(17·18))))
    c = 1.0 - p2 * (1 / 240) * c
    c = 1.0 - p2 * (1 / 182) * c
    c = 1.0 - p2 * (1 / 132) * c
    c = 1.0 - p2 * (1 / 90) * c
    c = 1.0 - p2 * (1 / 56) * c
    c = 1.0 - p2 * (1 / 30) * c
    c = 1.0 - p2 * (1 / 12) * c
    c = 1.0 - p2 * 0.5 * c
    sin = phi * s
    return (sin, c) if hi else (c, sin)


@jit
def _box_muller(words, zc, zs):
    """zc[b], zs[b] = R cos θ, R sin θ of Philox block b's words (words (4, m) uint32; zc, zs
    (m,) float64): R = √(−2 ln U), U = (W + 1) 2^-64, W = words 0 (low), 1 (high) as a 64-bit
    integer, so U in [2^-64, 1] and R <= 9.42; θ = (q + t) π/2, q the top 2 bits of word 3, t
    its other 30 and word 2's 32 as a fraction. Branch-free and libm-free: the loop vectorizes."""
    for b in range(zc.shape[0]):
        w3 = words[3, b]
        u = ((np.float64(words[0, b]) + 1.0) * 2.3283064365386963e-10
             + np.float64(words[1, b])) * 2.3283064365386963e-10
        r = math.sqrt(-2.0 * _log_unit(u))
        t = (np.float64(words[2, b]) * 2.3283064365386963e-10
             + np.float64(w3 & np.uint32(0x3FFFFFFF))) * 9.313225746154785e-10
        ca, sa = _sincos_quarter(t)
        q = w3 >> np.uint32(30)  # (cos, sin) of θ: (c, s), (−s, c), (−c, −s), (s, −c)
        odd = (q & np.uint32(1)) != np.uint32(0)
        c, s = (sa, ca) if odd else (ca, sa)
        zc[b] = -r * c if (q == np.uint32(1)) | (q == np.uint32(2)) else r * c
        zs[b] = -r * s if q >= np.uint32(2) else r * s


_F = np.float32
_F2_32, _F2_30 = _F(2.3283064365386963e-10), _F(9.313225746154785e-10)  # 2^-32, 2^-30
_F_LN2, _F_HALF_PI, _F_SQRT_HALF = _F(0.6931471805599453), _F(1.5707963267948966), _F(0.70710677)
_F1, _F2, _FH, _F0 = _F(1), _F(2), _F(0.5), _F(0)
_FLOG = tuple(_F(1 / k) for k in (11, 9, 7, 5, 3))
_FSIN = tuple(_F(1 / k) for k in (72, 42, 20, 6))  # φ²/((2j)(2j+1)), j = 4..1
_FCOS = tuple(_F(1 / k) for k in (90, 56, 30, 12, 2))  # φ²/((2j−1)(2j)), j = 5..1


@jit
def _box_muller32(words, z):
    """Box–Muller in float32 arithmetic (8 lanes a vector, shorter series), two pairs a block:
    z[2h, b], z[2h + 1, b] = R cos θ, R sin θ from block b's words 2h (radius), 2h + 1 (angle).
    words (4, m) uint32, z (4, m) float32. R = √(−2 ln U), U = (W 2^32 + X + 1) 2^-64 with W the
    radius word; X (32 more bits) moves R by under 2^-21 R (U relative, or 1 − U, by under
    2^-21) unless W or ~W < 2^20, so this pass takes X = 2^31 − 1 and _radius_tail redoes the
    1 in 2,048 others with X drawn. Near U = 1, ln U is
    ln(1 − ε), ε = (~W + 1/2) 2^-32 from the complemented word: small radii keep float32's
    relative precision. θ = (q + t) π/2, q the angle word's top 2 bits, t its other 30."""
    for b in range(z.shape[1]):
        for h in range(2):
            w, wa = words[2 * h, b], words[2 * h + 1, b]
            eps = (_F(np.uint32(~w)) + _FH) * _F2_32  # 1 − U
            u = (_F(w) + _FH) * _F2_32
            e = _F0
            for k in range(5, -1, -1):  # u = m 2^-e, m in [1/2, 1): exact power-of-two steps
                small = u < _F(2.0 ** -(1 << k))
                u = u * _F(2.0 ** (1 << k)) if small else u
                e = e + _F(1 << k) if small else e
            low = u < _F_SQRT_HALF
            u = u + u if low else u
            e = e + _F1 if low else e
            near = eps < _F(0.25)  # U > 3/4: m − 1 = −ε exactly
            num = -eps if near else u - _F1
            den = _F2 - eps if near else u + _F1
            e = _F0 if near else e
            sv = num / den
            s2 = sv * sv
            p = _FLOG[0]
            for c in _FLOG[1:]:
                p = p * s2 + c
            r = math.sqrt(-_F2 * (_F2 * sv * (p * s2 + _F1) - e * _F_LN2))
            t = _F(wa & np.uint32(0x3FFFFFFF)) * _F2_30  # may round to 1: the quarter's end
            hi = t > _FH
            phi = (_F1 - t if hi else t) * _F_HALF_PI
            p2 = phi * phi
            sn = _F1
            for c in _FSIN:
                sn = _F1 - p2 * c * sn
            cs = _F1
            for c in _FCOS:
                cs = _F1 - p2 * c * cs
            sn = phi * sn
            ca, sa = (sn, cs) if hi else (cs, sn)
            q = wa >> np.uint32(30)  # (cos, sin) of θ: (c, s), (−s, c), (−c, −s), (s, −c)
            odd = (q & np.uint32(1)) != np.uint32(0)
            c_, s_ = (sa, ca) if odd else (ca, sa)
            z[2 * h, b] = -r * c_ if (q == np.uint32(1)) | (q == np.uint32(2)) else r * c_
            z[2 * h + 1, b] = -r * s_ if q >= np.uint32(2) else r * s_


@jit
def _radius_tail(words, z, first, c1, c2, c3, k0, k1):
    """_box_muller32's radii with W or ~W < 2^20 (1 pair in 2,048), redone with 64 bits:
    X is word p % 4 of Philox block (2^31 | p // 4, c1, c2, c3), p the pair (main blocks have
    c0 < 2^30), and the pair rescaled to R = √(−2 ln U) in float64 (libm: rare)."""
    small = np.uint32(1 << 20)
    for g0 in range(0, z.shape[1], 32):  # a vectorized min over 32 blocks finds the rare ones
        g1 = min(g0 + 32, z.shape[1])
        least = small
        for b in range(g0, g1):
            w0, w2 = words[0, b], words[2, b]
            least = min(least, min(min(w0, np.uint32(~w0)), min(w2, np.uint32(~w2))))
        if least < small:
            _radius_tail_scan(words, z, first, c1, c2, c3, k0, k1, g0, g1)


@jit
def _radius_tail_scan(words, z, first, c1, c2, c3, k0, k1, g0, g1):
    """_radius_tail's work on blocks g0:g1."""
    for b in range(g0, g1):
        for h in range(2):
            w = words[2 * h, b]
            if min(w, np.uint32(~w)) < np.uint32(1 << 20):
                pair = 2 * (first + b) + h
                x0, x1, x2, x3 = philox4x32(np.uint32(0x80000000) | np.uint32(pair >> 2), c1, c2,
                                            c3, k0, k1)
                j = pair & 3
                x = x0 if j == 0 else (x1 if j == 1 else (x2 if j == 2 else x3))
                if w < np.uint32(1 << 20):  # U small: ln U
                    ln_u = math.log((np.float64(w) * 4294967296.0 + np.float64(x) + 1.0)
                                    * 5.421010862427522e-20)
                    ln_then = math.log((np.float64(w) + 0.5) * 2.3283064365386963e-10)
                else:  # U near 1: ln(1 − ε), ε = 1 − U = (~W 2^32 + ~X) 2^-64
                    nw, nx = np.float64(np.uint32(~w)), np.float64(np.uint32(~x))
                    ln_u = math.log1p(-(nw * 4294967296.0 + nx) * 5.421010862427522e-20)
                    ln_then = math.log1p(-(nw + 0.5) * 2.3283064365386963e-10)
                scale = math.sqrt(ln_u / ln_then)  # R / the pass's R
                z[2 * h, b] = np.float32(z[2 * h, b] * scale)
                z[2 * h + 1, b] = np.float32(z[2 * h + 1, b] * scale)


@jit
def philox_soa(words, first, c1, c2, c3, k0, k1):
    """words[:, b] = Philox4x32-10 of counter (first + b, c1, c2, c3).   words (4, m) uint32."""
    for b in range(words.shape[1]):
        w0, w1, w2, w3 = philox4x32(np.uint32(first + b), c1, c2, c3, k0, k1)
        words[0, b] = w0
        words[1, b] = w1
        words[2, b] = w2
        words[3, b] = w3


@jit
def add_normal(g, start, std, k0, k1, c1, c2, c3):
    """g[j] += std Z(start + j): Z(i) parameter i's standard normal by Box–Muller on Philox blocks
    (counter (block, c1, c2, c3), key (k0, k1)). float64 g: one pair a block, Z(2b), Z(2b + 1) =
    R cos θ, R sin θ of block b (_box_muller); float32 g: two pairs a block, Z(4b + 2h),
    Z(4b + 2h + 1) from block b's words 2h, 2h + 1 (_box_muller32). g (n,), std in its dtype."""
    n = g.shape[0]
    chunk = 512  # blocks at a time: 8 KiB of words and 8-16 KiB of normals, in L1
    per = 4 if g.itemsize == 4 else 2  # normals per block
    words = np.empty((4, chunk), np.uint32)
    z = np.empty((4, chunk), g.dtype)
    b0 = start // per
    while per * b0 < start + n:
        philox_soa(words, b0, c1, c2, c3, k0, k1)
        if per == 4:
            _box_muller32(words, z)
            _radius_tail(words, z, b0, c1, c2, c3, k0, k1)
        else:
            _box_muller(words, z[0], z[1])
        off = per * b0
        for i in range(max(start, off), min(start + n, off + per * chunk)):
            e = i - off
            g[i - start] += std * (z[e & 3, e >> 2] if per == 4 else z[e & 1, e >> 1])
        b0 += chunk
