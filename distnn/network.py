"""`Network`: a dense feed-forward net whose gradient is the proxy-error recursion, as GEMMs.

Layers l = 0..L, with inputs I_l (I_0 = X), weights W_l of shape (|O_l|, |I_l|) and biases b_l:

    forward    Z_l = I_l W_lᵀ + b_l,   O_l = A_l(Z_l),   I_{l+1} = O_l
    output     O_L = mean(Z_L), the family's canonical inverse link (see families.py)
    backward   P_L = O_L - Y,   P_l = (P_{l+1} W_{l+1}) ∘ A'_l(O_l)
    gradient   ∂/∂W_l = P_lᵀ I_l,   ∂/∂b_l = Σ_samples P_l      (sums over the batch)

The element-wise passes between the GEMMs are compiled kernels (kernels.py): the bias add fused
with A_l, the output pass (mean, loss, correct count, P_L and its bias sum in one), and A'_l applied
to P_l fused with the next bias gradient, so a step is GEMMs plus one pass per layer.

All parameters live in one contiguous vector `params` laid out layer by layer as [W_0, b_0, W_1, ...];
`weights[l]` and `biases[l]` are views into it, and gradients are written into a vector of the same
layout, so an optimizer step, an allreduce or a checkpoint sees one flat array.

The loss is the mean per-sample negative log-likelihood plus `l2 Σ‖W_l‖² + l1 Σ|W_l|` (biases are not
penalized). The class is pure math: no MPI, no I/O. `grad_sum` and `loss_sum` return sums over the
batch (`grad_sum` divided by a given count, the global batch size) so that data-parallel callers
can add them across ranks.
"""

import math

import numpy as np

from . import activations, families, kernels

DTYPES = {"float32": np.float32, "float64": np.float64}
_CACHE_SIZE = 4  # batch shapes with live work buffers: full shard, last shard, validation, one spare


class _Buffers:
    """Work arrays for one batch size, allocated once and reused by every step of that size.

    The output layer's arrays are (N, n_out) views of class-major (n_out, N) memory: the softmax's
    max and sum over a handful of classes then run along contiguous rows, and BLAS computes
    Z_L = I_L W_Lᵀ as its transpose W_L I_Lᵀ (measured for 64-128-128-10 at batch 64 in float32:
    1.0 against 3.9 us for the max, 2.7 against 4.9 us for the GEMM)."""

    def __init__(self, n, sizes, dtype):
        hidden, k = sizes[1:-1], sizes[-1]
        output = lambda: np.empty((k, n), dtype).T  # noqa: E731
        self.z = [np.empty((n, h), dtype) for h in hidden] + [output()]  # Z_l, overwritten by O_l
        self.mean = output()  # O_L; z[-1] keeps the logits Z_L
        self.delta = [np.empty((n, h), dtype) for h in hidden] + [output()]  # proxy errors P_l
        self.bias_sum = np.empty(k, dtype)  # the output pass's Σ_n P_L where no gradient wants it
        self.correct = None  # the last output pass's correct count (None: regression)
        self.sq = self.scale = None  # DP-SGD: per-sample squared norms, clip factors (N,)


class Network:
    """Dense feed-forward network with a GLM output family; see the module docstring."""

    def __init__(self, sizes, activation="relu", family="multinomial", l1=0.0, l2=0.0,
                 dtype=np.float64, seed=0):
        self.sizes = [_layer_size(s, i) for i, s in enumerate(sizes)]
        if len(self.sizes) < 2:
            raise ValueError(f"a network needs at least an input and an output size, got {list(sizes)}")
        if activation not in activations.NAMES:
            raise ValueError(f"unknown activation {activation!r}; expected one of {list(activations.NAMES)}")
        if family not in families.NAMES:
            raise ValueError(f"unknown family {family!r}; expected one of {list(families.NAMES)}")
        self._out = families.FAMILIES[family]
        if self._out.labels and self.sizes[-1] < 2:
            raise ValueError(f"a {family} network needs at least 2 outputs (one per class)")
        for name, lam in (("l1", l1), ("l2", l2)):
            if not (np.isfinite(lam) and lam >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {lam!r}")
        self.activation, self.family, self.l1, self.l2 = activation, family, float(l1), float(l2)
        self.dtype = np.dtype(DTYPES.get(dtype, dtype))
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")

        self.shapes = layer_shapes(self.sizes)  # (|O_l|, |I_l|) of each layer's weights
        self._slices = layout(self.shapes)  # each step's penalty and views walk it
        self.n_params = self._slices[-1][1].stop
        self.params = np.empty(self.n_params, self.dtype)
        self.weights, self.biases = _layer_views(self.params, self.shapes)
        self._act = activations.ACTIVATIONS[activation]
        self._buffers = {}
        self._views_of, self._views = None, None  # see _grad_views
        self.init_params(seed)

    # ---- construction ------------------------------------------------------------------------
    def init_params(self, seed):
        """He (rectifiers) or Glorot (others) initialization from `seed`, the same on every process."""
        _initialize(self.weights, self.biases, self._act.init, seed)

    def spec(self):
        """The architecture as a JSON-able dict: `Network(**net.spec())` rebuilds it."""
        return {"sizes": self.sizes, "activation": self.activation, "family": self.family,
                "l1": self.l1, "l2": self.l2, "dtype": self.dtype.name}

    @property
    def is_classifier(self):
        """Whether the family decides classes (and eval_sums counts correct decisions)."""
        return self._out.is_classifier

    @property
    def decisions(self):
        """Classification decisions per sample: 1 for multinomial, n_out for bernoulli; None for
        regression. Accuracy is the correct count over N * decisions."""
        return self._out.decisions(self.sizes[-1])

    def grad_buffer(self):
        """A zeroed vector laid out like `params`, for gradients."""
        return np.zeros(self.n_params, self.dtype)

    # ---- validation (once per call of the public methods; never inside grad_sum) --------------
    def check_inputs(self, X):
        """X as a (N, n_in) array of the network dtype; clear ValueError for bad shape or values."""
        return _inputs(X, self.sizes[0], self.dtype)

    def check_targets(self, y, n=None):
        """Targets encoded for the family (labels as intp, others as (N, K) network dtype)."""
        Y = self._out.targets(y, self.sizes[-1], self.dtype)
        if n is not None and len(Y) != n:
            raise ValueError(f"X has {n} rows but y has {len(Y)}")
        return Y

    def _checked(self, X, y, what=None):
        """(X, Y) checked; `what`, a mean over the samples, refuses none (0/0 is no number)."""
        X = self.check_inputs(X)
        if what and len(X) == 0:
            raise ValueError(f"{what}: X holds no samples; a mean over none is undefined")
        return X, self.check_targets(y, len(X))

    # ---- forward and backward ----------------------------------------------------------------
    def _buffers_for(self, n):
        buf = self._buffers.pop(n, None)
        if buf is None:
            buf = _Buffers(n, self.sizes, self.dtype)
            if len(self._buffers) >= _CACHE_SIZE:
                self._buffers.pop(next(iter(self._buffers)))  # drop the least recently used shape
        self._buffers[n] = buf  # re-insert: dict order is recency order
        return buf

    def _forward(self, X, mean=True):
        """Fill the work buffers for X (N, n_in) already checked; returns them. mean=False leaves
        the output mean to the caller (grad_sum fuses it with the loss and P_L)."""
        buf = self._buffers_for(len(X))
        inp = X
        last = len(self.weights) - 1
        for l, (w, b, z) in enumerate(zip(self.weights, self.biases, buf.z)):
            np.matmul(inp, w.T, out=z)  # (N, |O_l|)
            if l < last:
                self._act.forward(z, b)  # O_l = A(Z_l + b_l) overwrites Z_l: backward needs only O_l
                inp = z
            else:
                kernels.add_rows(z.T, b)  # the logits, class-major (|O_L|, N)
        if mean:
            self._out.mean(buf.z[-1].T, buf.mean.T)
        return buf

    def _output_pass(self, buf, Y, divisor, bias_sum):
        """buf.delta[-1] = P_L = (O_L - Y) / divisor from the logits, bias_sum = Σ_n P_L; the loss
        sum (float64). Records the correct count for last_correct."""
        loss, buf.correct = self._out.output_pass(buf.z[-1].T, Y, buf.delta[-1].T,
                                                  self.dtype.type(divisor), bias_sum)
        return loss

    def _backward(self, X, buf, out):
        """Proxy-error recursion from P_L in buf.delta[-1] (whose bias sum the output pass wrote):
        the batch-summed gradient into `out`."""
        g_w, g_b = self._grad_views(out)
        for l in range(len(self.weights) - 1, -1, -1):
            p = buf.delta[l]  # (N, |O_l|)
            inp = X if l == 0 else buf.z[l - 1]  # I_l = O_{l-1}
            np.matmul(p.T, inp, out=g_w[l])  # Σ_n P_l[n] ⊗ I_l[n]
            if l > 0:
                prev = buf.delta[l - 1]
                np.matmul(p, self.weights[l], out=prev)  # P_l W_l, (N, |I_l|)
                # ∘ A'_{l-1}(O_{l-1}), and the bias gradient Σ_n P_{l-1}[n] in the same pass
                self._act.backward(prev, buf.z[l - 1], g_b[l - 1])
        return out

    def _grad_views(self, out):
        """Per-layer views of a gradient vector; the last one's are kept, as a step reuses it."""
        if self._views_of is not out:
            self._views_of, self._views = out, _layer_views(out, self.shapes)
        return self._views

    def grad_sum(self, X, Y, out, divisor=1, weights=None, clip=0.0):
        """Hot path: the data-loss gradient summed over the batch, divided by `divisor`, into `out`;
        returns the loss sum (not divided). With `weights` (N,), sample n's loss and gradient count
        w_n times: its row of P_L is scaled by w_n / divisor after the output pass (divisor then
        Σw).

        Backward is linear in P_L, so dividing the (N, n_out) P_L by the global batch size gives
        every rank its share of the mean gradient at the cost of a pass over P_L instead of one over
        the whole gradient; ranks' shares add up to the mean with no division after the allreduce.
        X is (N, n_in) in the network dtype and Y comes from `check_targets`: no validation here.
        An empty batch writes zeros and returns 0.0, so a rank with no rows still takes part.
        `clip` > 0: each sample's gradient clipped to that L2 norm first (DP-SGD; see
        clipped_grad_sum)."""
        if clip:
            if weights is not None:
                raise ValueError("per-sample clipping takes no sample weights")
            return self.clipped_grad_sum(X, Y, out, clip, divisor)
        buf = self._forward(X, mean=False)
        gb = self._grad_views(out)[1][-1]  # the output layer's bias gradient
        if weights is None:
            loss = self._output_pass(buf, Y, divisor, gb)  # P_L = O_L - Y, fused
        else:  # Σ_n w_n ℓ_n needs the per-sample losses: a pass of their own
            self._output_pass(buf, Y, 1, gb)  # P_L = O_L - Y, unscaled
            loss = float(np.dot(weights, self._out.losses(buf.z[-1], Y)))
            p = buf.delta[-1]  # (N, n_out)
            np.multiply(p, (weights / divisor).astype(p.dtype)[:, None], out=p)
            np.sum(p, axis=0, out=gb)  # Σ_n w_n P_L[n] / divisor
        self._backward(X, buf, out)
        return loss

    def clipped_grad_sum(self, X, Y, out, clip, divisor=1):
        """Σ_n c_n g_n / divisor into `out`, g_n sample n's data-loss gradient and c_n = min(1,
        clip / ‖g_n‖) (biases in the norm); returns the (unclipped) loss sum. One backward,
        exactly: P_l = (P_{l+1} W_{l+1}) ∘ A'(O_l) is linear in P_L row by row and A'(O_l) does
        not depend on P, so scaling row n of P_L by c_n scales row n of every P_l by c_n. The
        unscaled P_l (all kept) give ‖g_n‖² = Σ_l ‖P_l[n]‖² (‖I_l[n]‖² + 1); then each P_l's rows
        are scaled (with its bias sum) before its weight GEMM (c ∘ P_l)ᵀ I_l: a plain step's
        GEMMs, one more pass over each P_l and I_l, two (N,) vectors of memory."""
        buf = self._forward(X, mean=False)
        n = len(X)
        if buf.sq is None:
            buf.sq, buf.scale = np.empty(n, np.float64), np.empty(n, self.dtype)
        g_w, g_b = self._grad_views(out)
        loss = self._output_pass(buf, Y, 1, g_b[-1])  # P_L = O_L - Y, unscaled
        sq = buf.sq
        sq[:] = 0
        last = len(self.weights) - 1
        for l in range(last, -1, -1):
            inp = X if l == 0 else buf.z[l - 1]  # I_l, (N, |I_l|)
            kernels.add_sample_sq_norms(buf.delta[l], inp, sq)
            if l > 0:  # P_{l-1}, unscaled (the bias sums written here are rewritten below)
                np.matmul(buf.delta[l], self.weights[l], out=buf.delta[l - 1])
                self._act.backward(buf.delta[l - 1], buf.z[l - 1], g_b[l - 1])
        kernels.clip_scales(sq, float(clip), float(divisor), buf.scale)
        for l in range(last, -1, -1):
            p = buf.delta[l]
            if l == last:
                kernels.scale_cols(p.T, buf.scale, g_b[l])  # class-major (|O_L|, N)
            else:
                kernels.scale_rows(p, buf.scale, g_b[l])
            np.matmul(p.T, X if l == 0 else buf.z[l - 1], out=g_w[l])  # Σ_n c_n P_l[n] ⊗ I_l[n]
        return loss

    def last_signal_maxabs(self, X):
        """Column maxima of |P_l| and |I_l| over the rows of the last grad_sum(X, ...), concatenated
        per layer [P_0 (|O_0|), I_0 (|I_0|), P_1, I_1, ...]. They bound that gradient element-wise,
        |Σ_s P_l[s, j] I_l[s, k]| <= N max|P_l[:, j]| max|I_l[:, k]|: deterministic mode's grid."""
        buf = self._buffers[len(X)]
        out = np.zeros(sum(o + i for o, i in self.shapes), self.dtype)  # |x| >= 0: NaN stays
        ints = np.dtype(f"i{self.dtype.itemsize}")  # colmax_abs works on the float bits
        bits, mask = out.view(ints), ints.type(np.iinfo(ints).max)
        at = 0
        for l, (p, (o, i)) in enumerate(zip(buf.delta, self.shapes)):
            inp = np.ascontiguousarray(X) if l == 0 else buf.z[l - 1]
            if l == len(self.shapes) - 1:
                kernels.rowmax_abs(p.T, out[at:at + o])  # the output layer is class-major
            else:
                kernels.colmax_abs(p.view(ints), bits[at:at + o], mask)
            kernels.colmax_abs(inp.view(ints), bits[at + o:at + o + i], mask)
            at += o + i
        return out

    def loss_sum(self, X, Y):
        """Sum of per-sample losses (no penalty) for checked X and encoded Y."""
        return self.eval_sums(X, Y)[0]

    def last_correct(self, Y):
        """Correctly classified count in the last output pass over len(Y) rows (grad_sum's or
        eval_sums'); None for regression."""
        return self._buffers[len(Y)].correct

    def eval_sums(self, X, Y):
        """(loss sum, count classified correctly or None for regression), one forward pass."""
        buf = self._forward(X, mean=False)
        loss = self._output_pass(buf, Y, 1, buf.bias_sum)  # P_L into scratch: unused
        return loss, buf.correct

    # ---- penalties ---------------------------------------------------------------------------
    def penalty(self):
        """l2 Σ‖W‖² + l1 Σ|W| over the weights (not biases), added once to the mean loss."""
        total = 0.0
        for w in self.weights:
            if self.l2:
                total += self.l2 * float(np.einsum("ij,ij->", w, w, dtype=np.float64))
            if self.l1:
                total += self.l1 * float(np.abs(w).sum(dtype=np.float64))
        return total

    def add_penalty_grad(self, grad, start=0):
        """grad += 2 l2 W + l1 sign(W) on the weights, for grad laid out like params[start:start +
        len(grad)] (the whole vector by default; a rank's slice in a sharded update)."""
        if not (self.l1 or self.l2):
            return grad
        stop = start + len(grad)
        for weights, _ in self._slices:
            a, b = max(weights.start, start), min(weights.stop, stop)
            if a < b:  # element-wise: the same bits however the vector is cut
                _add_penalty_grad(grad[a - start:b - start], self.params[a:b], self.l1, self.l2)
        return grad

    # ---- the public, validating surface ------------------------------------------------------
    def predict(self, X):
        """Mean response (N, n_out): values, probabilities or rates."""
        return self._forward(self.check_inputs(X)).mean.copy()

    def logits(self, X):
        """Output pre-activations Z_L (N, n_out)."""
        X = self.check_inputs(X)
        return self._forward(X).z[-1].copy()

    def loss(self, X, y):
        """Mean loss over the samples plus the penalties, as a float."""
        X, Y = self._checked(X, y, what="loss")
        return self.loss_sum(X, Y) / len(X) + self.penalty()

    def gradient(self, X, y):
        """Gradient of `loss(X, y)` with respect to `params`, shaped like `params`."""
        X, Y = self._checked(X, y, what="gradient")
        g = self.grad_buffer()
        self.grad_sum(X, Y, g, divisor=len(X))
        return self.add_penalty_grad(g)

    def sample_grad_norms(self, X, y):
        """Per-sample L2 norms of the data-loss gradient, (N,), without forming any gradient:
        ‖P ⊗ I‖ = ‖P‖ ‖I‖, so each layer adds ‖P_l[n]‖² (‖I_l[n]‖² + 1), the 1 for the bias."""
        X, Y = self._checked(X, y)
        self.clipped_grad_sum(X, Y, self.grad_buffer(), math.inf)  # the norms, nothing clipped
        return np.sqrt(self._buffers[len(X)].sq).astype(self.dtype)

    # ---- Jacobians ---------------------------------------------------------------------------
    def _jacobian_walk(self, X):
        """Yield (l, G_l, I_l) from the output down, G_l = d O_L / d Z_l of shape (N, n_out, |O_l|)."""
        X = self.check_inputs(X)
        buf = self._forward(X)
        g = self._out.jacobian(buf.mean)  # d O_L / d Z_L
        for l in range(len(self.weights) - 1, -1, -1):
            inp = X if l == 0 else buf.z[l - 1]
            yield l, g, inp
            g = g @ self.weights[l]  # d O_L / d I_l, (N, n_out, |I_l|)
            if l > 0:
                g *= activations.derivative(self.activation, inp)[:, None, :]

    def input_jacobian(self, X):
        """d outputs / d inputs, (N, n_out, n_in)."""
        for l, g, _ in self._jacobian_walk(X):
            if l == 0:
                return g @ self.weights[0]

    def param_jacobian(self, X):
        """d outputs / d params, (N, n_out, n_params), columns in the `params` layout."""
        n, k = len(X), self.sizes[-1]
        jac = np.empty((n, k, self.n_params), self.dtype)
        slices = self._slices
        for l, g, inp in self._jacobian_walk(X):
            w_at, b_at = slices[l]
            jac[:, :, w_at] = (g[:, :, :, None] * inp[:, None, None, :]).reshape(n, k, -1)
            jac[:, :, b_at] = g
        return jac


def layer_shapes(sizes):
    """(|O_l|, |I_l|) of each layer's weights in a network of `sizes` [n_in, ..., n_out]."""
    return list(zip(sizes[1:], sizes[:-1]))


def layout(shapes):
    """(weight slice, bias slice) of each layer of weight `shapes` in the flat parameter vector
    [W_0, b_0, W_1, b_1, ...]: the one place that lays parameters out."""
    slices, at = [], 0
    for o, i in shapes:
        slices.append((slice(at, at + o * i), slice(at + o * i, at + o * i + o)))
        at += o * i + o
    return slices


def n_params(sizes):
    """Length of the flat parameter vector of a network of `sizes` (at least 2 of them)."""
    return layout(layer_shapes(sizes))[-1][1].stop


def _layer_views(flat, shapes):
    """Per-layer (weights, biases) views of a flat vector laid out [W_0, b_0, W_1, b_1, ...]."""
    pairs = [(flat[w].reshape(shape), flat[b]) for (w, b), shape in zip(layout(shapes), shapes)]
    return [w for w, _ in pairs], [b for _, b in pairs]


def _initialize(weights, biases, scheme, seed):
    """Hidden weights by `scheme` ("he" or "glorot"), the output layer's Glorot, biases 0."""
    rng = np.random.default_rng(seed)
    for l, (w, b) in enumerate(zip(weights, biases)):
        fan_out, fan_in = w.shape
        hidden = l < len(weights) - 1
        if hidden and scheme == "he":
            w[...] = rng.normal(0.0, np.sqrt(2.0 / fan_in), w.shape)
        else:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w[...] = rng.uniform(-limit, limit, w.shape)
        b[...] = 0


def _inputs(X, n_in, dtype):
    X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    if X.ndim != 2 or X.shape[1] != n_in:
        raise ValueError(f"X has shape {X.shape}; expected (N, {n_in}) "
                         f"for a network with {n_in} inputs")
    X = X.astype(dtype, copy=False)
    bad = ~np.isfinite(X)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"X contains NaN or Inf (first at row {i}, column {j})")
    return X


def _add_penalty_grad(g, w, l1, l2):
    """g += 2 l2 w + l1 sign(w), in place."""
    if l2:
        g += (2 * l2) * w
    if l1:
        g += l1 * np.sign(w)


def _layer_size(s, i):
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
        raise ValueError(f"layer size {i} must be an integer >= 1, got {s!r}")
    return int(s)
