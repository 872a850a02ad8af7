"""Optimizers on one flat parameter vector, learning-rate schedules, and gradient clipping.

An optimizer holds named state vectors parallel to the parameters (SGD: velocity; Adam: m, v) and
a step count, allocated once by `init` in the parameters' dtype. A step is one compiled pass over
the vectors (kernels.sgd_update, kernels.adam_update: the formula numpy would evaluate, in its
order and dtype, fused): it allocates nothing and, given the same bits, yields the same bits on
every rank. The caller's gradient buffer may be spent as scratch: after `step`, treat `grad` as
garbage. With `threads` > 1 a long vector is updated in that many slices at once (the kernels
release the GIL): every operation is element-wise, so the bits do not depend on the split, and a
rank with several cores updates on all of them, as its GEMMs run.
Hyper-parameters come out of `config()` and back in through `make_optimizer(**config)`; state goes
out through `state_dict()` as plain arrays, so checkpointing it is trivial.

Schedules are pure functions of the step in `SCHEDULES`; `lr_at` adds linear warmup to any of them.
"""

import inspect
import math

import numpy as np

from . import kernels
from .threads import run_parallel


class OptimizerError(ValueError):
    """A bad optimizer name, hyper-parameter, schedule or state; the message says which and why."""


class _Optimizer:
    """What every optimizer shares: state vectors, step count `t`, (de)serialization."""

    name = ""
    slots = ()  # names of the state vectors, each shaped like the parameters

    def __init__(self, lr):
        self.lr = _above("lr", lr, 0.0)
        self.t = 0  # steps taken: Adam's bias-correction exponent
        self.state = {}
        self._like = None  # (shape, dtype) of the parameters the state is for
        self.threads = 1  # slices updated at once (Trainer sets its BLAS thread count)

    def init(self, params):
        """Allocate zero state like `params`; a repeat with the same size and dtype keeps it."""
        if self._like is not None:
            if self._like == (params.shape, params.dtype):
                return
            raise OptimizerError(
                f"{self.name}: state is for {self._like[0][0]} {self._like[1]} parameters, "
                f"got {params.size} {params.dtype}; make a new optimizer for other parameters")
        if params.ndim != 1 or params.dtype.kind != "f":
            raise OptimizerError(f"{self.name}: parameters must be a 1-D float vector, "
                                 f"got shape {params.shape} dtype {params.dtype}")
        self.state = {k: np.zeros(params.shape, params.dtype) for k in self.slots}
        self._like = (params.shape, params.dtype)

    def step(self, params, grad, lr=None, part=None):
        """Update `params` in place; `lr` overrides self.lr. Overwrites `grad`, the caller's scratch.
        With `part` (a slice), only params[part] and its state, from grad[part]: the share of one
        rank in an update sharded between ranks; the other elements' state goes stale."""
        if self._like != (params.shape, params.dtype):
            self.init(params)  # the first step allocates; another size or dtype raises
        if (grad.shape, grad.dtype) != (params.shape, params.dtype):
            raise OptimizerError(f"{self.name}: gradient is {grad.shape} {grad.dtype}, "
                                 f"parameters are {params.shape} {params.dtype}")
        if not (params.flags.c_contiguous and grad.flags.c_contiguous):
            raise OptimizerError(f"{self.name}: parameters and gradient must be contiguous vectors")
        self.t += 1
        lr, dt, state = float(self.lr if lr is None else lr), params.dtype.type, self.state.values()
        if part is None and params.size < 2 * _MIN_SLICE:  # the hot path of small nets
            self._update(params, grad, *state, lr=lr, dt=dt)
            return
        part = slice(0, params.size) if part is None else part
        run_parallel(lambda b: self._update(params[b], grad[b], *(v[b] for v in state), lr=lr, dt=dt),
                     [slice(part.start + s.start, part.start + s.stop)
                      for s in _slices(part.stop - part.start, self.threads)])

    def state_dict(self):
        """Copies of all that continuing bit-identically needs: state vectors and `t` (0-d int64)."""
        state = {k: v.copy() for k, v in self.state.items()}
        return {"t": np.array(self.t, dtype=np.int64)} | state

    def load_state_dict(self, d):
        """Restore `state_dict()` output; refuses missing or extra keys, wrong shapes or dtypes."""
        missing, extra = {"t", *self.slots} - d.keys(), d.keys() - {"t", *self.slots}
        if missing or extra:
            raise OptimizerError(f"{self.name} state: missing keys {sorted(missing)}, "
                                 f"unexpected keys {sorted(extra)}; expected {['t', *self.slots]}")
        t = np.asarray(d["t"])
        if t.shape != () or t.dtype.kind not in "iu" or t < 0:
            raise OptimizerError(f"{self.name} state 't': expected a non-negative 0-d integer, "
                                 f"got shape {t.shape} dtype {t.dtype}")
        # The vectors must match the parameters this optimizer was set up for, else one another.
        ref = self._like
        if ref is None and self.slots:
            first = np.asarray(d[self.slots[0]])
            ref = first.shape, first.dtype
        for k in self.slots:
            a = np.asarray(d[k])
            if a.ndim != 1 or a.dtype.kind != "f" or (a.shape, a.dtype) != ref:
                raise OptimizerError(f"{self.name} state {k!r}: expected a 1-D float vector "
                                     f"{ref[0]} {ref[1]}, got {a.shape} {a.dtype}")
        if self._like is None and ref is not None:
            self.init(np.empty(ref[0], ref[1]))
        for k in self.slots:
            np.copyto(self.state[k], d[k])
        self.t = int(t)


class SGD(_Optimizer):
    """torch.optim.SGD: g += wd*p; v = mu*v + g; u = g + mu*v (nesterov) or v; p -= lr*u."""

    name = "sgd"

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(lr)
        self.momentum = _at_least("momentum", momentum, 0.0, below=1.0)  # 1: v never decays
        self.nesterov = bool(nesterov)
        self.weight_decay = _at_least("weight_decay", weight_decay, 0.0)
        if self.nesterov and self.momentum == 0:
            raise OptimizerError("sgd: nesterov=True needs momentum > 0")
        self.slots = ("velocity",) if self.momentum else ()

    def config(self):
        """JSON-able hyper-parameters; make_optimizer(**config()) rebuilds this optimizer."""
        return {"name": self.name, "lr": self.lr, "momentum": self.momentum,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def _update(self, p, g, v=None, *, lr, dt):
        """kernels.sgd_update with the scalars in the dtype; without momentum v is never read."""
        kernels.sgd_update(p, g, p[:0] if v is None else v, dt(lr), dt(self.momentum),
                           dt(self.weight_decay), self.nesterov)


class Adam(_Optimizer):
    """torch.optim.Adam: g += wd*p; m, v: EMAs of g, g^2; p -= lr m/(1-b1^t) / (sqrt(v/(1-b2^t))+eps)."""

    name = "adam"
    slots = ("m", "v")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise OptimizerError(f"{self.name}: betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _above("eps", eps, 0.0)  # 0 divides by 0 where a gradient stayed 0
        self.weight_decay = _at_least("weight_decay", weight_decay, 0.0)

    def config(self):
        """JSON-able hyper-parameters; make_optimizer(**config()) rebuilds this optimizer."""
        return {"name": self.name, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _decay(self, lr):
        """(weight decay added to the gradient, factor p is multiplied by first): Adam's L2
        penalty in the gradient, so that 1/sqrt(v) rescales it too."""
        return self.weight_decay, 1.0

    def _update(self, p, g, m, v, *, lr, dt):
        """kernels.adam_update with the scalars in the dtype."""
        b1, b2 = self.betas
        wd, keep = self._decay(lr)
        # Bias corrections are float64 Python scalars, each cast once to the parameter dtype.
        kernels.adam_update(p, g, m, v, dt(lr / (1 - b1**self.t)), dt(b1), dt(b2), dt(1 - b1),
                            dt(1 - b2), dt(math.sqrt(1 - b2**self.t)), dt(self.eps), dt(wd), dt(keep))


class AdamW(Adam):
    """torch.optim.AdamW: p *= 1 - lr*wd, decoupled from the moments, then the Adam update."""

    name = "adamw"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(lr, betas, eps, weight_decay)

    def _decay(self, lr):
        return 0.0, 1 - lr * self.weight_decay  # decoupled: p *= 1 - lr wd before the update


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}

_MIN_SLICE = 1 << 18  # elements: below ~1 MB a slice's pass costs less than handing it to a thread


def _slices(n, threads):
    """[slice] cutting range(n) into up to `threads` parts of >= _MIN_SLICE, at multiples of 64."""
    k = max(1, min(int(threads), n // _MIN_SLICE))
    cuts = [n * i // k // 64 * 64 for i in range(k)] + [n]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


def make_optimizer(name, **hyper):
    """Build optimizer `name` from keyword hyper-parameters; refuses unknown names and keywords."""
    if name not in OPTIMIZERS:
        raise OptimizerError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    valid = list(inspect.signature(OPTIMIZERS[name]).parameters)
    unknown = sorted(set(hyper) - set(valid))
    if unknown:
        raise OptimizerError(f"optimizer {name!r}: unknown hyper-parameter(s) {unknown}; "
                             f"valid: {valid}")
    return OPTIMIZERS[name](**hyper)


def _at_least(key, value, low, below=math.inf):
    """float(value), refusing values outside [low, below) with a message naming `key`."""
    if not low <= value < below:  # the negation also refuses NaN
        bound = f">= {low}" if below == math.inf else f"in [{low}, {below})"
        raise OptimizerError(f"{key} must be {bound}, got {value!r}")
    return float(value)


def _above(key, value, low):
    """float(value), refusing values at or below `low` (or not finite) naming `key`."""
    if not low < value < math.inf:
        raise OptimizerError(f"{key} must be a finite number > {low}, got {value!r}")
    return float(value)


def _required(key, value, schedule):
    """A positive step count that `schedule` cannot do without."""
    if value is None or not value > 0:
        raise OptimizerError(f"schedule {schedule!r} needs {key} > 0, got {value!r}")
    return value


def _constant(step, base_lr, **_):
    return base_lr


def _step_decay(step, base_lr, *, step_size, gamma, **_):
    return base_lr * gamma ** (step // _required("step_size", step_size, "step"))


def _cosine(step, base_lr, *, total_steps, min_lr, **_):
    total = _required("total_steps", total_steps, "cosine")
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * min(step, total) / total)) / 2


def _linear(step, base_lr, *, total_steps, min_lr, **_):
    total = _required("total_steps", total_steps, "linear")
    return min_lr + (base_lr - min_lr) * (1 - min(step, total) / total)


SCHEDULES = {"constant": _constant, "step": _step_decay, "cosine": _cosine, "linear": _linear}


def lr_at(step, base_lr, schedule="constant", *, total_steps=None, step_size=None, gamma=0.1,
          warmup_steps=0, min_lr=0.0):
    """Learning rate at 0-based `step`: base_lr (step+1)/warmup_steps while warming up, then the
    schedule from its own step 0 over the total_steps - warmup_steps that remain (the convention
    of torch's SequentialLR([LinearLR, schedule]) and of the usual "cosine with warmup")."""
    if schedule not in SCHEDULES:
        raise OptimizerError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    if step < 0 or warmup_steps < 0:
        raise OptimizerError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")
    lr = SCHEDULES[schedule](max(step - warmup_steps, 0), base_lr, step_size=step_size, gamma=gamma,
                             total_steps=total_steps and max(total_steps - warmup_steps, 1),
                             min_lr=min_lr)  # called while warming up too: it checks its settings
    return base_lr * (step + 1) / warmup_steps if step < warmup_steps else lr


def clip_by_global_norm(grad, max_norm):
    """Scale `grad` in place down to L2 norm `max_norm` if longer; return the norm before clipping.

    A non-finite norm is returned with `grad` untouched, for the caller to skip the step.
    """
    if not max_norm > 0:
        raise OptimizerError(f"max_norm must be > 0, got {max_norm!r}")
    norm = global_norm(grad)
    if math.isfinite(norm) and norm > max_norm:
        grad *= grad.dtype.type(max_norm / norm)
    return norm


def global_norm(x):
    """L2 norm of a vector as a float, finite whenever x is, the same bits for the same x (a fixed
    summation order, kernels.sum_squares). Squares add in float64, which a float32 vector cannot
    overflow; a float64 one whose squares do (from 1.3e154 on) is scaled by 1 / max |x| first."""
    x = np.ascontiguousarray(x)
    norm = math.sqrt(kernels.sum_squares(x, 1.0))
    if math.isinf(norm):
        top = float(np.abs(x).max())  # NaN or Inf in x: the norm is not finite indeed
        if math.isfinite(top):
            norm = top * math.sqrt(kernels.sum_squares(x, 1.0 / top))
    return norm
