"""`Recurrent`: the dense `Network` applied through time, z(t) = f(x(t), r(t)), trained by BPTT.

The feed-forward net f = `self.net` has sizes [n_in + S, *hidden, n_out + S] (S = `state`). At step
t its input is I_0(t) = [x(t), r(t)] (x first, r(0) = 0) and its output layer's units split in two:

    prediction   y(t) = mean(Z_L(t)[:n_out])          the family's canonical inverse link
    next state   r(t+1) = s(Z_L(t)[n_out:] )          s = `state_activation`

so the hidden layers and their kernels are exactly the Network's. The gradient is the Network's
proxy-error recursion unrolled in time (backpropagation through time), from the last step down:

    P_L(t) = [ (mean − Y)(t) / divisor  at scored steps, 0 elsewhere ,
               (P_0(t+1) W_0[:, n_in:]) ∘ s'(r(t+1)) ]      (0 at the last step, or at a cut)
    P_l(t) = (P_{l+1}(t) W_{l+1}) ∘ A'(O_l(t)),      ∂/∂W_l = Σ_t P_l(t)ᵀ I_l(t)

Per-step activations live in (T, N, width) buffers, so the weight gradients are one GEMM per layer
over all T·N rows. Sequences may be shorter than T (`lengths`): the steps t >= length do not exist,
their inputs are zeroed in the buffers (whatever X held there), nothing there is scored, and their
proxy errors are 0, so padding changes nothing. Truncated BPTT (`bptt` = k > 0) runs the forward pass
through the whole sequence but stops the state's proxy error at the window starts t = k, 2k, ...:
each window of k steps back-propagates within itself, from the state carried into it. The windows
start at t = 0 for every sequence, and the step's gradient still sums all windows (one update per
batch); k >= T is full BPTT. Gradients that explode through time are caught by the trainer's
divergence stop; clipping (`Trainer(clip_norm=...)`) is the usual remedy.

DP-SGD (`clipped_grad_sum`, `sample_grad_norms`): a sample is a sequence, its gradient the sum of
its targets' gradients through time, clipped whole in the same BPTT: its norm per layer is a T×T
Gram product, ‖Σ_t P(t) ⊗ I(t)‖² = Σ_{t,s} (P(t)·P(s)) (I(t)·I(s)), and the recursion is linear in
each sequence's P_L rows, so its clip factor scales them before the weight GEMMs.

`param_jacobian` is the independent check: the forward recursion of Jacobians
dz(t)/dw = ∂f/∂w + ∂f/∂r · dr(t)/dw, built from a Network's `param_jacobian` and `input_jacobian`.
Pure math: no MPI, no I/O. The targets a sequence model trains on are `Targets` (encoded targets with
the sequences' lengths), so that whatever picks rows of Y (the trainer's batches) picks both.
"""
import math
import re

import numpy as np

from . import activations, families, kernels
from .network import Network, _layer_size

TARGETS = ("last", "every")  # one target per sequence at its last step, or one per step
_CACHE_SIZE = 4  # (N, T) shapes with live work buffers, as Network's


class Targets:
    """Encoded targets of N sequences and their lengths (N,): Y for grad_sum and eval_sums.

    `y` is (N,) labels or (N, K) for targets "last"; (N, T) labels or (N, T, K) for "every", with
    0 at the steps that do not exist. Indexing by sample rows keeps targets and lengths together."""

    __slots__ = ("y", "lengths", "every")

    def __init__(self, y, lengths, every):
        self.y, self.lengths, self.every = y, lengths, every

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, rows):
        return Targets(self.y[rows], self.lengths[rows], self.every)

    def counts(self, rows=None):
        """Targets per sequence (of `rows`, or all): its length for "every", else 1."""
        lengths = self.lengths if rows is None else self.lengths[rows]
        return lengths if self.every else np.ones(len(lengths), np.intp)

    @property
    def total(self):
        """How many targets exist: Σ lengths for "every", N for "last"."""
        return int(self.lengths.sum()) if self.every else len(self.lengths)


class _Buffers:
    """Work arrays for N sequences of T steps, allocated once and reused by every step of that shape.
    Time is the leading axis, so each layer's per-step arrays stack into (T·N, width) for the
    weight-gradient GEMMs."""

    def __init__(self, n, t, sizes, dtype):
        hidden, k = sizes[1:-1], sizes[-1]
        self.inp = np.zeros((t, n, sizes[0]), dtype)  # I_0(t) = [x(t), r(t)]
        self.hid = [np.empty((t, n, h), dtype) for h in hidden]  # O_l(t)
        self.out = np.empty((t, n, k), dtype)  # [logits Z_L(t)[:n_out], r(t+1)]
        self.dhid = [np.empty((t, n, h), dtype) for h in hidden]  # P_l(t)
        self.dout = np.empty((t, n, k), dtype)  # P_L(t)
        self.gb = np.empty(max(sizes[1:]), dtype)  # a backward kernel's per-step bias sum
        self.lengths = None  # of the last forward pass
        self.correct = None
        self.sq = self.scale = None  # DP-SGD: per-sequence squared norms, clip factors (N,)
        self.gram = {}  # DP-SGD: the Gram kernel's float64 scratch per layer shape, when needed


class Recurrent:
    """A recurrent net [x, r] -> [y, r'] over the dense `Network`; see the module docstring."""

    def __init__(self, sizes, state, activation="relu", state_activation="tanh",
                 family="multinomial", targets="last", l1=0.0, l2=0.0, dtype=np.float64, seed=0):
        sizes = [_layer_size(s, i) for i, s in enumerate(sizes)]
        if len(sizes) < 2:
            raise ValueError(f"a recurrent network needs at least an input and an output size, "
                             f"got {sizes}")
        self.state = _layer_size(state, "state")
        if state_activation not in activations.NAMES:
            raise ValueError(f"unknown state_activation {state_activation!r}; expected one of "
                             f"{list(activations.NAMES)}")
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {list(TARGETS)}, got {targets!r}")
        if family in families.FAMILIES and families.FAMILIES[family].labels and sizes[-1] < 2:
            raise ValueError(f"a {family} network needs at least 2 outputs (one per class)")
        self.sizes = sizes  # [n_in, *hidden, n_out] as the user sees them
        self.n_in, self.n_out = sizes[0], sizes[-1]
        self.net = Network([self.n_in + self.state, *sizes[1:-1], self.n_out + self.state],
                           activation=activation, family=family, l1=l1, l2=l2, dtype=dtype,
                           seed=seed)
        self.state_activation, self.targets = state_activation, targets
        self.bptt = 0  # truncated BPTT window (Trainer(bptt=k) sets it); 0: the whole sequence
        self._out = families.FAMILIES[family]
        self._act = activations.ACTIVATIONS[activation]
        self._state = activations.ACTIVATIONS[state_activation]
        self._state_forward = _STATE_FORWARD.get(state_activation, self._state.forward)
        self._buffers = {}
        self._correct = None

    # ---- what the trainer and the checkpoints share with Network -----------------------------
    params = property(lambda self: self.net.params)
    n_params = property(lambda self: self.net.n_params)
    dtype = property(lambda self: self.net.dtype)
    shapes = property(lambda self: self.net.shapes)  # the layers' (|O_l|, |I_l|), params layout
    weights = property(lambda self: self.net.weights)
    biases = property(lambda self: self.net.biases)
    activation = property(lambda self: self.net.activation)
    family = property(lambda self: self.net.family)
    l1 = property(lambda self: self.net.l1)
    l2 = property(lambda self: self.net.l2)
    is_classifier = property(lambda self: self.net.is_classifier)

    @property
    def decisions(self):
        """Classification decisions per target (None for regression), as Network.decisions."""
        return self._out.decisions(self.n_out)

    def init_params(self, seed):
        self.net.init_params(seed)

    def grad_buffer(self):
        return self.net.grad_buffer()

    def penalty(self):
        return self.net.penalty()

    def add_penalty_grad(self, grad, start=0):
        return self.net.add_penalty_grad(grad, start)

    def spec(self):
        """The architecture as a JSON-able dict with kind "recurrent": model.build(spec) rebuilds it."""
        return {"kind": "recurrent", "sizes": self.sizes, "state": self.state,
                "activation": self.activation, "state_activation": self.state_activation,
                "family": self.family, "targets": self.targets, "l1": self.l1, "l2": self.l2,
                "dtype": self.dtype.name}

    @staticmethod
    def steps(X):
        """Time steps of a batch X (N, T, n_in): the rows each sequence adds to a gradient sum."""
        return X.shape[1]

    # ---- validation (public methods, the trainer's checks; never inside grad_sum) -------------
    def check_lengths(self, lengths, n, steps):
        """lengths as (n,) intp in 1..steps (None: every sequence has all `steps`; steps None:
        no upper bound)."""
        if lengths is None:
            return np.full(n, steps or 1, np.intp)
        if isinstance(lengths, Targets):
            lengths = lengths.lengths
        a = np.asarray(lengths)
        if a.ndim != 1 or len(a) != n:
            raise ValueError(f"lengths has shape {a.shape}; expected ({n},), one per sequence")
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a) | (a != np.round(a))
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"lengths must be integers; sequence {i} has {a[i].item()!r}")
        elif a.dtype.kind not in "iu":
            raise ValueError(f"lengths must be integers, got dtype {a.dtype}")
        bad = (a < 1) | (a > (steps or np.inf))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"lengths[{i}] = {a[i].item()!r} is outside 1..{steps} (X has {steps} "
                             f"steps)")
        return a.astype(np.intp)

    def check_inputs(self, X, lengths=None):
        """(X as (N, T, n_in) in the network dtype, lengths (N,) intp): a sequence's inputs are both.
        Clear ValueError for bad shapes, lengths or values (NaN/Inf only where steps exist: padding
        may hold anything)."""
        try:
            X = np.asarray(X)
        except ValueError:
            raise ValueError("X is ragged: pad the sequences to one (N, T, n_in) array and give "
                             "their lengths") from None
        if X.dtype.kind not in "biuf":
            raise ValueError(f"X must be numeric (N, T, {self.n_in}) sequences, got dtype {X.dtype}"
                             + (" (ragged? pad them and give lengths)" if X.dtype == object else ""))
        if X.ndim != 3 or X.shape[2] != self.n_in or X.shape[1] < 1:
            raise ValueError(f"X has shape {X.shape}; expected (N, T, {self.n_in}): N sequences "
                             f"of T >= 1 steps of {self.n_in} inputs")
        lengths = self.check_lengths(lengths, len(X), X.shape[1])
        X = X.astype(self.dtype, copy=False)
        check_finite_steps(X, lengths)
        return X, lengths

    def check_targets(self, y, n=None, lengths=None, steps=None):
        """Targets(encoded y, lengths) for sequences of `steps` (given, or taken from y for "every";
        1 for "last"); the targets at steps that do not exist are not looked at."""
        y = np.asarray(y)
        if self.targets == "last":
            Y = self._out.targets(y, self.n_out, self.dtype)
            _same_count(n, len(Y))
            lengths = self.check_lengths(lengths, len(Y), steps)
        else:
            Y, lengths = self._every_targets(y, n, lengths, steps)
        return Targets(Y, lengths, self.targets == "every")

    def _every_targets(self, y, n_x, lengths, steps):
        labels, k = self._out.labels, self.n_out
        if y.ndim == 3 and y.shape[2] == 1 and (labels or k == 1):
            y = y[:, :, 0]
        per_step = () if labels or k == 1 else (k,)
        if y.ndim != 2 + len(per_step) or y.shape[2:] != per_step or (steps and y.shape[1] != steps):
            t = steps or "T"
            want = f"(N, {t})" if not per_step else f"(N, {t}, {k})"
            raise ValueError(f"targets='every' takes one target per step: y has shape {y.shape}; "
                             f"expected {want}" + (f" or (N, {t}, 1)" if not per_step else ""))
        n, t = y.shape[:2]
        _same_count(n_x, n)
        lengths = self.check_lengths(lengths, n, t)
        alive = np.arange(t)[None, :] < lengths[:, None]  # (N, T)
        if y.dtype.kind in "biuf":
            y = np.where(alive.reshape(alive.shape + (1,) * len(per_step)), y, 0)  # padding: 0
        try:
            flat = self._out.targets(y.reshape(n * t, *per_step), k, self.dtype)
        except ValueError as e:  # "row r" of the flattened targets is sequence r // T, step r % T
            raise ValueError(re.sub(r"row (\d+)", lambda m: f"sequence {int(m[1]) // t}, step "
                                    f"{int(m[1]) % t}", str(e))) from None
        return flat.reshape(n, t, *flat.shape[1:]), lengths

    def _checked(self, X, y, lengths, what=None):
        X, lengths = self.check_inputs(X, lengths)
        if what and len(X) == 0:
            raise ValueError(f"{what}: X holds no sequences; a mean over none is undefined")
        return X, self.check_targets(y, len(X), lengths, X.shape[1])

    # ---- forward and backward ----------------------------------------------------------------
    def _buffers_for(self, n, t):
        buf = self._buffers.pop((n, t), None)
        if buf is None:
            buf = _Buffers(n, t, self.net.sizes, self.dtype)
            if len(self._buffers) >= _CACHE_SIZE:
                self._buffers.pop(next(iter(self._buffers)))  # the least recently used shape
        self._buffers[(n, t)] = buf
        return buf

    def _forward(self, X, lengths):
        """Run f through the T steps of X (N, T, n_in), checked; the buffers hold every step."""
        n, t_all = X.shape[:2]
        buf = self._buffers_for(n, t_all)
        buf.lengths = lengths
        inp, n_in, n_out = buf.inp, self.n_in, self.n_out
        padded = bool((lengths < t_all).any())
        xs = inp[:, :, :n_in]
        if padded:  # steps that do not exist read zeros, whatever X holds there
            alive = _alive(lengths, t_all)  # (T, N)
            xs[...] = 0
            np.copyto(xs, X.swapaxes(0, 1), where=alive[:, :, None])
            keep = alive[:, :, None].astype(self.dtype)
        else:
            xs[...] = X.swapaxes(0, 1)
        inp[0, :, n_in:] = 0  # r(0) = 0
        weights, biases = self.net.weights, self.net.biases
        last = len(weights) - 1
        for t in range(t_all):
            x = inp[t]
            for l, (w, b) in enumerate(zip(weights, biases)):
                if l < last:
                    z = buf.hid[l][t]
                    np.matmul(x, w.T, out=z)  # (N, |O_l|)
                    self._act.forward(z, b)
                    x = z
                else:
                    z = buf.out[t]
                    np.matmul(x, w.T, out=z)  # (N, n_out + S)
                    kernels.identity_forward(z[:, :n_out], b[:n_out])  # the logits
                    self._state_forward(z[:, n_out:], b[n_out:])  # r(t+1)
            if t + 1 < t_all:
                if padded:  # a sequence that has ended carries no state into its padding
                    np.multiply(z[:, n_out:], keep[t + 1], out=inp[t + 1, :, n_in:])
                else:
                    inp[t + 1, :, n_in:] = z[:, n_out:]
        return buf

    def _scored(self, buf, Y):
        """(positions in the T·N stacked rows, targets there, sequence of each) of the targets."""
        t_all, n = buf.out.shape[:2]
        lengths = buf.lengths
        if not Y.every:
            return (lengths - 1) * n + np.arange(n), Y.y, None
        if (lengths == t_all).all():
            pos = np.arange(t_all * n)
            seq = np.tile(np.arange(n), t_all)
            return pos, Y.y.swapaxes(0, 1).reshape(t_all * n, *Y.y.shape[2:]), seq
        pos = np.flatnonzero(_alive(lengths, t_all))  # t-major: t N + n
        seq, step = pos % n, pos // n
        return pos, Y.y[seq, step], seq

    def _output_pass(self, buf, Y, divisor, weights=None, backward=True):
        """The family's pass over the scored logits: P_L's prediction part into buf.dout (zero
        where nothing is scored); returns the loss sum. Records the correct count."""
        t_all, n, k = buf.out.shape
        pos, y, seq = self._scored(buf, Y)
        logits = buf.out.reshape(t_all * n, k)[pos, :self.n_out]  # (M, n_out)
        p = np.empty_like(logits)
        gb = buf.gb[:self.n_out]
        div = self.dtype.type(divisor if weights is None else 1)
        loss, self._correct = self._out.output_pass(logits.T, y, p.T, div, gb)
        buf.correct = self._correct
        if weights is not None:  # each target of sequence i counts w_i
            w = weights if seq is None else weights[seq]
            loss = float(np.dot(w, self._out.losses(logits, y)))
            np.multiply(p, (w / divisor).astype(p.dtype)[:, None], out=p)
        if backward:
            flat = buf.dout.reshape(t_all * n, k)
            flat[:, :self.n_out] = 0
            flat[pos, :self.n_out] = p
        return loss

    def _backward(self, buf, out, bptt):
        """BPTT from the prediction part of P_L in buf.dout: the batch- and time-summed gradient
        into `out` (laid out like params)."""
        g_w, g_b = self.net._grad_views(out)
        self._bptt(buf, g_b, bptt)
        t_all, n, k = buf.out.shape
        kernels.colsum(buf.dout.reshape(t_all * n, k), g_b[-1])
        self._weight_grads(buf, g_w)
        return out

    def _bptt(self, buf, g_b, bptt):
        """The proxy errors P_l(t) of every step into buf.dout's state part and buf.dhid, from the
        prediction part of buf.dout, and the hidden layers' bias gradients g_b[:-1] (summed over
        N, then t, from T-1 down). Linear in the prediction part, row by row."""
        weights = self.net.weights
        t_all = buf.out.shape[0]
        n_in, n_out, last = self.n_in, self.n_out, len(weights) - 1
        w_state = weights[0][:, n_in:]  # (|O_0|, S): the state columns of the first layer
        for b in g_b[:-1]:
            b[...] = 0
        buf.dout[t_all - 1, :, n_out:] = 0  # r(T) feeds nothing
        for t in range(t_all - 1, -1, -1):
            p = buf.dout[t]
            self._state.backward(p[:, n_out:], buf.out[t][:, n_out:], buf.gb[:self.state])
            for l in range(last, 0, -1):
                below = buf.dhid[l - 1][t]
                np.matmul(p, weights[l], out=below)  # P_l W_l, (N, |I_l|)
                gb = buf.gb[:below.shape[1]]
                self._act.backward(below, buf.hid[l - 1][t], gb)  # ∘ A'(O_{l-1})
                g_b[l - 1] += gb
                p = below
            if t > 0:
                state = buf.dout[t - 1, :, n_out:]  # r(t)'s proxy error, before ∘ s'
                if bptt and t % bptt == 0:
                    state[...] = 0  # a window starts at t: its state is carried, not trained through
                else:
                    np.matmul(p, w_state, out=state)  # (N, S)

    def _stacked(self, buf):
        """Each layer's (P_l, I_l) at every step: (T, N, |O_l|) and (T, N, |I_l|)."""
        last = len(self.net.weights) - 1
        return [((buf.dout if l == last else buf.dhid[l]),
                 (buf.inp if l == 0 else buf.hid[l - 1])) for l in range(last + 1)]

    def _weight_grads(self, buf, g_w):
        rows = buf.out.shape[0] * buf.out.shape[1]
        for l, (p, inp) in enumerate(self._stacked(buf)):
            # Σ_t Σ_n P_l ⊗ I_l, one GEMM over T·N rows
            np.matmul(p.reshape(rows, -1).T, inp.reshape(rows, -1), out=g_w[l])

    def grad_sum(self, X, Y, out, divisor=1, weights=None, lengths=None, bptt=None, clip=0.0):
        """Hot path: the data-loss gradient summed over the sequences and their steps, divided by
        `divisor`, into `out`; returns the loss sum. X (N, T, n_in) in the network dtype, Y the
        Targets of check_targets (or encoded targets with `lengths`): no validation here. `weights`
        (N,): every target of sequence i counts w_i. `bptt`: the truncation window (None: self.bptt).
        An empty batch writes zeros and returns 0.0. `clip` > 0: each sequence's gradient clipped
        to that L2 norm first (DP-SGD; see clipped_grad_sum)."""
        if clip:
            if weights is not None:
                raise ValueError("per-sample clipping takes no sample weights")
            return self.clipped_grad_sum(X, Y, out, clip, divisor, lengths, bptt)
        Y = self._as_targets(Y, lengths, X)
        if len(X) == 0:
            return self._empty_sum(out)
        buf = self._forward(X, Y.lengths)
        loss = self._output_pass(buf, Y, divisor, weights)
        self._backward(buf, out, self.bptt if bptt is None else bptt)
        return loss

    def _empty_sum(self, out):
        """A batch with no sequences (a rank without rows still takes part): zeros, loss 0."""
        out[...] = 0
        self._correct = 0 if self.is_classifier else None
        return 0.0

    def clipped_grad_sum(self, X, Y, out, clip, divisor=1, lengths=None, bptt=None):
        """Σ_n c_n g_n / divisor into `out`, g_n sequence n's data-loss gradient (of the sum of its
        targets' losses: a sample is a sequence) and c_n = min(1, clip / ‖g_n‖), biases in the
        norm; returns the (unclipped) loss sum. Arguments as grad_sum's.

        One BPTT, exactly, as Network.clipped_grad_sum: the recursion (the state's proxy error
        and its truncation included) is linear in P_L row by row and A', s' do not depend on P,
        so scaling sequence n's rows of P_L at every step by c_n scales its P_l(t) by c_n. The
        weights are shared through time, so g_n of layer l is Σ_t P_l[t,n] ⊗ I_l[t,n] and its
        norm does not factor: ‖g_n‖² = Σ_l Σ_{t,s} (P_l[t,n]·P_l[s,n]) (I_l[t,n]·I_l[s,n] + 1), a
        T×T Gram product per sequence and layer (the 1: the bias Σ_t P_l[t,n]), or, where T
        is long, each g_n formed (_layer_sq_norms picks the cheaper). Then each layer's (T·N,
        width) rows are scaled by c_n (with its bias sum) before the plain step's one weight
        GEMM. Steps beyond a sequence's length have P = 0 (and are not visited)."""
        Y = self._as_targets(Y, lengths, X)
        if len(X) == 0:
            return self._empty_sum(out)
        buf = self._forward(X, Y.lengths)
        n = len(X)
        loss = self._output_pass(buf, Y, 1)  # P_L's prediction part, unscaled
        g_w, g_b = self.net._grad_views(out)
        self._bptt(buf, g_b, self.bptt if bptt is None else bptt)  # biases rewritten below
        if buf.sq is None:
            buf.sq, buf.scale = np.empty(n, np.float64), np.empty(n, self.dtype)
        buf.sq[:] = 0
        stacked = self._stacked(buf)
        t_all = buf.out.shape[0]
        for p, inp in stacked:
            _layer_sq_norms(p, inp, Y.lengths, buf.sq, buf)
        kernels.clip_scales(buf.sq, float(clip), float(divisor), buf.scale)
        scale = np.tile(buf.scale, t_all)  # row t N + n of the stacked steps: c_n
        for (p, _), gb in zip(stacked, g_b):
            kernels.scale_rows(p.reshape(t_all * n, -1), scale, gb)  # P *= c, gb = Σ rows
        self._weight_grads(buf, g_w)
        return loss

    def sample_grad_norms(self, X, y, lengths=None):
        """Per-sequence L2 norms of the data-loss gradient (of the sum of a sequence's targets'
        losses), (N,), without forming any gradient (see clipped_grad_sum)."""
        X, Y = self._checked(X, y, lengths)
        if len(X) == 0:
            return np.zeros(0, self.dtype)
        self.clipped_grad_sum(X, Y, self.grad_buffer(), math.inf)  # the norms, nothing clipped
        return np.sqrt(self._buffers[X.shape[:2]].sq).astype(self.dtype)

    def _as_targets(self, Y, lengths, X):
        if isinstance(Y, Targets):
            return Y
        lengths = np.full(len(X), X.shape[1], np.intp) if lengths is None else np.asarray(lengths)
        return Targets(Y, lengths.astype(np.intp, copy=False), self.targets == "every")

    def eval_sums(self, X, Y, lengths=None):
        """(loss sum, count classified correctly or None for regression), one forward pass."""
        Y = self._as_targets(Y, lengths, X)
        if len(X) == 0:
            return 0.0, (0 if self.is_classifier else None)
        buf = self._forward(X, Y.lengths)
        return self._output_pass(buf, Y, 1, backward=False), self._correct

    def loss_sum(self, X, Y):
        return self.eval_sums(X, Y)[0]

    def last_correct(self, Y):
        """Correct decisions in the last output pass (grad_sum's or eval_sums'); None: regression."""
        return self._correct

    def last_signal_maxabs(self, X):
        """Column maxima of |P_l| and |I_l| over all T·N rows of the last grad_sum(X, ...), per
        layer [P_0, I_0, P_1, I_1, ...], as Network.last_signal_maxabs: with time summed too, a
        chunk of c sequences adds c T rows, so the grid takes c T as its chunk size (step.py)."""
        buf = self._buffers[X.shape[:2]]
        out = np.zeros(sum(o + i for o, i in self.shapes), self.dtype)
        ints = np.dtype(f"i{self.dtype.itemsize}")
        bits, mask = out.view(ints), ints.type(np.iinfo(ints).max)
        rows, last, at = X.shape[0] * X.shape[1], len(self.shapes) - 1, 0
        for l, (o, i) in enumerate(self.shapes):
            p = (buf.dout if l == last else buf.dhid[l]).reshape(rows, o)
            inp = (buf.inp if l == 0 else buf.hid[l - 1]).reshape(rows, i)
            kernels.colmax_abs(p.view(ints), bits[at:at + o], mask)
            kernels.colmax_abs(inp.view(ints), bits[at + o:at + o + i], mask)
            at += o + i
        return out

    # ---- the public, validating surface ------------------------------------------------------
    def _predicted(self, X, lengths, mean=True):
        X, lengths = self.check_inputs(X, lengths)
        n, t_all = X.shape[:2]
        k = self.n_out
        if n == 0:
            return np.zeros((0, k) if self.targets == "last" else (0, t_all, k), self.dtype)
        buf = self._forward(X, lengths)
        z = buf.out[:, :, :k]  # (T, N, n_out) logits
        res = np.empty((k, t_all, n), self.dtype)  # class-major, as the family kernels take it
        if mean:
            self._out.mean(np.ascontiguousarray(z.reshape(t_all * n, k).T), res.reshape(k, -1))
        else:
            res[...] = z.transpose(2, 0, 1)
        res = res.transpose(2, 1, 0)  # (N, T, n_out)
        if self.targets == "last":
            return res[np.arange(n), lengths - 1].copy()
        res = np.where(_alive(lengths, t_all).T[:, :, None], res, 0).astype(self.dtype)
        return res

    def predict(self, X, lengths=None):
        """Mean response: (N, n_out) at each sequence's last step for targets "last", (N, T, n_out)
        for "every" (0 at steps that do not exist)."""
        return self._predicted(X, lengths)

    def logits(self, X, lengths=None):
        """The prediction units' pre-activations, shaped as predict's."""
        return self._predicted(X, lengths, mean=False)

    def loss(self, X, y, lengths=None):
        """Mean loss over the targets that exist, plus the penalties, as a float."""
        X, Y = self._checked(X, y, lengths, what="loss")
        return self.loss_sum(X, Y) / Y.total + self.penalty()

    def gradient(self, X, y, lengths=None):
        """Gradient of `loss(X, y, lengths)` with respect to `params` (full BPTT unless self.bptt)."""
        X, Y = self._checked(X, y, lengths, what="gradient")
        g = self.grad_buffer()
        self.grad_sum(X, Y, g, divisor=Y.total)
        return self.add_penalty_grad(g)

    # ---- Jacobians: the forward recursion --------------------------------------------------
    def param_jacobian(self, X, lengths=None):
        """d predictions / d params by the forward recursion dz(t)/dw = ∂f/∂w + ∂f/∂r · dr(t)/dw:
        (N, n_out, n_params) for targets "last", (N, T, n_out, n_params) for "every" (0 at steps
        that do not exist). ∂f/∂w and ∂f/∂[x, r] are a Network's param_jacobian and input_jacobian
        of the logits (a gaussian twin of `net`, whose link is the identity); the prediction then
        goes through the family's link and the state through state_activation."""
        X, lengths = self.check_inputs(X, lengths)
        n, t_all = X.shape[:2]
        k, s, m = self.n_out, self.state, self.n_params
        twin = Network(self.net.sizes, self.activation, "gaussian", dtype=self.dtype)
        twin.params[...] = self.params
        jac = np.zeros((n, t_all, k, m), self.dtype)
        if n == 0:
            return jac[:, -1] if self.targets == "last" else jac
        buf = self._forward(X, lengths)
        inp, out = buf.inp.copy(), buf.out.copy()  # the twin's passes reuse no buffer of ours
        dr = np.zeros((n, s, m), self.dtype)  # d r(t) / d params, r(0) = 0
        for t in range(t_all):
            dz = twin.param_jacobian(inp[t])  # ∂Z_L / ∂w, (N, k + S, m)
            dz += twin.input_jacobian(inp[t])[:, :, self.n_in:] @ dr  # + ∂Z_L/∂r · dr(t)/dw
            mean = np.empty((k, n), self.dtype)
            self._out.mean(np.ascontiguousarray(out[t][:, :k].T), mean)
            jac[:, t] = self._out.jacobian(mean.T) @ dz[:, :k]  # through the link
            dr = activations.derivative(self.state_activation, out[t][:, k:])[:, :, None] * dz[:, k:]
        jac *= _alive(lengths, t_all).T[:, :, None, None]
        if self.targets == "last":
            return jac[np.arange(n), lengths - 1]
        return jac


def _layer_sq_norms(p, inp, lengths, sq, buf):
    """sq[n] += sequence n's squared gradient norm of the layer whose proxy errors and inputs at
    every step are p (T, N, o) and inp (T, N, i), weights and bias, the cheaper way: the T×T Gram
    products cost L(L+1)/2 (o + i) multiply-adds for a sequence of length L, forming g_n = P_nᵀ I_n
    (L + 1) o i, and the latter runs in BLAS but one call per sequence. Measured (1 thread, 64
    sequences): Gram 0.3-0.4 ns a multiply-add (in cache, T <= 32 at width 200; 3x that beyond),
    formed 0.16 ns and 8 us a sequence. So the Gram products win up to T ≈ 32-40 for a 128 × 72
    layer and ≈ 50 for 16 × 16, where the flops alone would say 2 o i / (o + i): 92 and 16."""
    o, i = p.shape[2], inp.shape[2]
    length = lengths.astype(np.float64)
    gram_ns = _GRAM_NS * float(length @ (length + 1)) / 2 * (o + i)
    formed_ns = _FORMED_NS * float((length + 1).sum()) * o * i + _CALL_NS * len(length)
    if gram_ns <= formed_ns:
        scratch = buf.gram.get((o, i))
        if scratch is None:  # kept: fresh pages every step cost more than the products
            scratch = buf.gram[o, i] = kernels.sequence_scratch(p.shape[1], p.shape[0], o, i)
        kernels.add_sequence_sq_norms(p, inp, lengths, sq, scratch)
    else:
        _formed_sq_norms(p, inp, lengths, sq)


_GRAM_NS, _FORMED_NS, _CALL_NS = 0.4, 0.16, 8000.0  # _layer_sq_norms's costs, measured


def _formed_sq_norms(p, inp, lengths, sq, buf=None):
    """sq[n] += ‖Σ_t P[t,n] ⊗ I[t,n]‖² + ‖Σ_t P[t,n]‖², each sequence's gradient formed in float64
    (o i memory, one sequence at a time)."""
    for n, length in enumerate(lengths):
        pn = p[:length, n].astype(np.float64)  # (L, o)
        g = pn.T @ inp[:length, n].astype(np.float64)  # (o, i)
        bias = pn.sum(axis=0)
        sq[n] += float(np.einsum("ij,ij->", g, g)) + float(bias @ bias)


def _tanh_forward(z, b):
    """Z = tanh(Z + b): the bias kernel, then numpy's tanh, which is SIMD-vectorized where the
    compiled kernel calls libm once per element (256 x 128 float32: 55 against 290 us). The state's
    activation runs at every step on the critical path of the recursion, so it takes the faster."""
    kernels.identity_forward(z, b)
    np.tanh(z, out=z)


_STATE_FORWARD = {"tanh": _tanh_forward}  # else the activation table's kernel


def _same_count(n_x, n_y):
    if n_x is not None and n_x != n_y:
        raise ValueError(f"X has {n_x} sequences but y has {n_y}")


def _alive(lengths, steps):
    """(T, N) bool: whether step t of sequence n exists."""
    return np.arange(steps)[:, None] < lengths[None, :]


def check_finite_steps(X, lengths, rows=None, name="X", offset=0):
    """ValueError naming the first NaN/Inf in the steps that exist of X (N, T, d) (rows: which
    sequences of X, all by default; `offset` is added to the sequence numbers in the message)."""
    if X.dtype.kind != "f":
        return
    block = max(1, (1 << 20) // max(1, X.shape[1] * X.shape[2]))
    idx = np.arange(len(X)) if rows is None else np.asarray(rows)
    for lo in range(0, len(idx), block):
        part = idx[lo:lo + block]
        x = np.asarray(X[part])
        bad = ~np.isfinite(x) & (np.arange(x.shape[1])[None, :] < lengths[part][:, None])[:, :, None]
        if bad.any():
            i, t, j = np.argwhere(bad)[0]
            raise ValueError(f"{name} contains NaN or Inf (first at sequence {part[i] + offset}, "
                             f"step {t}, input {j})")
