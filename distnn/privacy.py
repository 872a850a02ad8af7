"""Differentially private SGD (DP-SGD): settings, Poisson membership, noise and the accountant.

    trainer = Trainer(net, SGD(lr=0.5), batch_size=256, privacy=DP(noise_multiplier=1.1,
                      max_grad_norm=1.0, delta=1e-5))

Each step t of a private run:
1. membership: each training row i joins step t's batch independently with probability
   q = B / N (B = the trainer's batch_size, the *expected* batch size); the draw is keyed by
   (seed, t) alone, so every rank computes the same sorted batch for any rank count, then works on
   its shard of it as usual;
2. per-sample clipping: `Network.grad_sum(..., clip=C)` scales sample n's gradient by
   c_n = min(1, C / ‖g_n‖), exactly, in the same backward (network.py says how);
3. after the one sum across ranks: noise N(0, σ²C²) per parameter, then the division by B (not by
   the realized batch size: the sum's sensitivity is C whatever the batch holds). Parameter j's
   noise is a pure function of (seed, t, j) (a counter-based generator, `add_noise`), never of
   the rank, so a sharded update draws only its own share and the vector is the same for any P;
4. the regularization penalty (a function of the parameters only), then the optimizer.

Batches and noise are keyed by a secret 128-bit key per run (os CSPRNG; `DP.noise_seed` fixes it
for reproducible runs), not by the training seed, which the config and model file show: anyone
who can regenerate the noise can subtract it, and anyone who knows the batches loses the
subsampling's amplification. The key rides in checkpoints (keep them as private as the data).

The accountant is `dp_accounting`'s RDP accountant for the Poisson-subsampled Gaussian, composed
over the steps taken; it is imported only when privacy is on (its import costs a second). What a
run spent is a list of (q, σ, steps) segments, kept in checkpoints: a resumed run composes them.
Not private: validation data and every metric (training loss and accuracy too: they are sums over
the sampled rows without noise); only the parameters (and so the model) carry the guarantee.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
from dataclasses import dataclass

import numpy as np

from . import kernels
from . import threads as threads_module

BLOCK = 1 << 16  # the fewest parameters worth a thread of their own in add_noise
MAX_PARAMS = 2**32  # the noise's counter word 0: parameter // 4 (float32) below 2^30
_MEMBERS = 1  # the purpose word of the batches' generator key (the noise has its own generator)
# RDP orders (TF Privacy's classic grid); dp_accounting drops an order whose series does not
# converge (1.1-1.4 at large q), with a warning per order and call that we keep quiet
ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))
# σ beyond these makes no sense and breaks the accountant's arithmetic (σ = 1e-300 divides by 0,
# 1e308 overflows); an ε budget past 100 protects nothing (e^100 odds)
SIGMA = (0.01, 1e6)
MAX_EPSILON = 100.0
INSTALL = "pip install 'dp-accounting>=0.6' (or distnn[privacy])"


class PrivacyBudgetError(ValueError):
    """Training on would spend more ε than the configured budget (target_epsilon)."""


@dataclass(frozen=True)
class DP:
    """DP-SGD settings. Give `noise_multiplier` σ, or `target_epsilon` alone and σ is calibrated to
    spend it over the configured epochs; with both, σ is used and target_epsilon is a budget that
    training refuses to exceed (e.g. when resumed with more epochs)."""

    noise_multiplier: float | None = None  # σ: noise std / max_grad_norm
    max_grad_norm: float = 1.0  # C: each sample's gradient is clipped to this L2 norm
    delta: float = 1e-5  # δ of (ε, δ)-DP; well below 1 / training rows
    target_epsilon: float | None = None  # ε to calibrate σ for, and the budget
    # the key of the batches' and the noise's streams; None: a secret one per run (kept in its
    # checkpoints, never in the model). Given, the run is reproducible, and private only while
    # this number is secret: whoever knows it can subtract the noise
    noise_seed: int | None = None

    def __post_init__(self):
        sigma, eps = self.noise_multiplier, self.target_epsilon
        if sigma is None and eps is None:
            raise ValueError("privacy: give noise_multiplier or target_epsilon (or both)")
        _check("noise_multiplier", sigma, lambda v: SIGMA[0] <= v <= SIGMA[1],
               f"in [{SIGMA[0]:g}, {SIGMA[1]:g}]", optional=True)
        _check("max_grad_norm", self.max_grad_norm, lambda v: v > 0, "> 0")
        _check("delta", self.delta, lambda v: 0 < v < 1, "in (0, 1)")
        _check("target_epsilon", eps, lambda v: 0 < v <= MAX_EPSILON, f"in (0, {MAX_EPSILON:g}]",
               optional=True)
        seed = self.noise_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or not 0 <= seed < 2**128):
            raise ValueError(f"privacy.noise_seed: expected an integer in [0, 2**128), got {seed!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, value):
        """A DP from a DP, a dict of its fields, or None (privacy off: None)."""
        if value is None or isinstance(value, DP):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"privacy: unknown settings {sorted(unknown)}")
            return cls(**value)
        raise TypeError(f"privacy must be a distnn.DP, a dict or None, got {type(value).__name__}")


def _check(name, value, ok, expected, optional=False):
    if value is None and optional:
        return
    good = (isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
            and math.isfinite(value) and ok(value))
    if not good:
        raise ValueError(f"privacy.{name}: expected a finite number {expected}, got {value!r}")


# ---------------------------------------------------------------------- counter-based streams

def secret_key():
    """A fresh 128-bit key from the operating system's CSPRNG, for a run's batches and noise."""
    return secrets.randbits(128)


def _generator(seed, purpose, step, block=0):
    """The stream keyed by (seed, purpose, step, block): numpy's SeedSequence hashes the key into
    an SFC64 state (its way to independent parallel streams; SFC64 draws normals ~1.5x faster
    than Philox here)."""
    key = np.random.SeedSequence([seed, purpose, step, block])
    return np.random.Generator(np.random.SFC64(key))


def members(seed, step, n, q):
    """Sorted indices of step `step`'s batch: each of n rows in independently with probability q.

    Drawn as geometric gaps between members (the number of Bernoulli(q) trials to the next
    success), so the cost is O(qN) = O(B) per step, not O(N); the same on every rank."""
    if q >= 1:
        return np.arange(n)
    rng = _generator(seed, _MEMBERS, step)
    parts, at = [], -1
    need = int(q * n + 6 * math.sqrt(q * n) + 16)  # one draw almost always reaches past n
    while at < n:
        pos = at + np.cumsum(rng.geometric(q, size=need))
        parts.append(pos)
        at = int(pos[-1])
    rows = np.concatenate(parts)
    return rows[:np.searchsorted(rows, n)]


def add_noise(grad, std, seed, step, start=0, threads=1):
    """grad += std * z[start:start + len(grad)], z the step's standard-normal vector over all
    parameters, in grad's dtype, cut among `threads` threads.

    z[i] is a pure function of (seed, step, i), so any share, cut or thread count gets the same
    values: Box–Muller on Philox4x32-10 blocks (kernels.add_normal; Philox passes TestU01's
    BigCrush), one pair a block in float64 (block i // 2), two in float32 (block i // 4), the
    block's counter and key the 128-bit seed, the step and the block one to one (_counter_key).
    Exact to the dtype's rounding: float64 noise is the transform's value to ~1e-16 relative,
    float32 noise the transform of its own 64-bit U to 2^-21 max(R, 1) absolute. The tail is exact
    out to R = √(2 ln 2^64) = 9.42: |z| never exceeds it, which removes 4.5e-21 of probability per
    draw (5e-9 over 10^6 steps of 10^6 parameters: far below any δ); numpy's float64 sampler has
    such a bound too (13.7)."""
    n = len(grad)
    if n == 0:
        return grad
    if not 0 <= step < 2**32 or start + n > MAX_PARAMS:
        raise ValueError(f"privacy noise: step {step} (< 2**32) or parameters {start + n:,} "
                         f"(<= {MAX_PARAMS:,}) out of the generator's counter range")
    key = _counter_key(seed, step)
    std = grad.dtype.type(std)

    def draw(span):
        lo, hi = span
        kernels.add_normal(grad[lo:hi], start + lo, std, *key)

    n_threads = max(1, min(int(threads or 1), n // BLOCK + 1))
    cuts = [n * k // n_threads for k in range(n_threads + 1)]
    spans = list(zip(cuts, cuts[1:]))
    if n_threads == 1:
        draw(spans[0])
    else:
        threads_module.run_parallel(draw, spans)
    return grad


def _counter_key(seed, step):
    """Philox's key (k0, k1) and counter words (c1, c2, c3) of a step's noise: the 128-bit secret
    as four 32-bit words, two the key and two in the counter beside the step; the counter's word
    0 is the block (< 2^31; kernels._radius_tail's extra blocks have its top bit set). One to one:
    no two draws of a run ever share a block."""
    w = [np.uint32((int(seed) >> (32 * k)) & 0xFFFFFFFF) for k in range(4)]
    return w[0], w[1], np.uint32(step), w[2], w[3]


# ---------------------------------------------------------------------------------- accountant

class MissingLibrary(ValueError):
    """dp-accounting is not installed (a ValueError: the command line says it in one line)."""


def _library():
    try:
        import dp_accounting
    except ImportError:
        raise MissingLibrary(f"privacy needs the dp-accounting library: {INSTALL}") from None
    return dp_accounting


def _event(q, sigma, steps):
    dp = _library()
    return dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma)), steps)


@contextlib.contextmanager
def _quiet():
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def epsilon(segments, delta):
    """ε at `delta` after the (q, σ, steps) segments, by dp_accounting's RDP accountant."""
    dp = _library()
    accountant = dp.rdp.RdpAccountant(list(ORDERS))
    with _quiet():
        for q, sigma, steps in segments:
            if steps:
                accountant.compose(_event(q, sigma, int(steps)))
        return float(accountant.get_epsilon(delta))


def calibrate(q, steps, delta, target):
    """The smallest σ (to dp_accounting's tolerance) whose `steps` steps at rate q spend at most
    `target` ε at `delta`."""
    dp = _library()
    with _quiet():
        try:
            sigma = dp.calibrate_dp_mechanism(
                lambda: dp.rdp.RdpAccountant(list(ORDERS)), lambda s: _event(q, s, steps),
                target, delta, bracket_interval=dp.ExplicitBracketInterval(*SIGMA), tol=1e-4)
        except Exception as e:  # no σ in range spends exactly target: the library's own errors
            raise ValueError(f"privacy.target_epsilon: no noise_multiplier in [{SIGMA[0]:g}, "
                             f"{SIGMA[1]:g}] spends ε = {target:g} at δ = {delta:g} over {steps} "
                             f"steps at rate {q:.4g} ({type(e).__name__})") from None
    return float(sigma)


def spend(segments, q, sigma, steps=1):
    """Record `steps` steps at rate q and noise σ in the accountant's segments (in place)."""
    if segments and segments[-1][0] == q and segments[-1][1] == sigma:
        segments[-1][2] += steps
    else:
        segments.append([q, sigma, steps])
    return segments


def record(dp, spent):
    """What done.json and `distnn info` say of a run's privacy: ε spent at δ, and how."""
    return {"epsilon": epsilon(spent, dp.delta), "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm,
            "target_epsilon": dp.target_epsilon, "steps": sum(int(s[2]) for s in spent),
            "sample_rate": spent[-1][0] if spent else None}


def resumed(saved, given):
    """A resumed run's privacy: the given settings, keeping the saved σ where they leave it to
    target_epsilon (σ was calibrated once, for the whole run: the accounting continues with it)."""
    given = DP.of(given)
    if given is None or given.noise_multiplier is not None or not saved:
        return given
    return dataclasses.replace(given, noise_multiplier=saved["noise_multiplier"])


def most_rows(batch_size, dp):
    """The rows a step's buffers are sized for: a Poisson batch (mean B) exceeds B + 6√B + 16 with
    probability < 1e-9 (the deterministic step grows its buffers for one that does)."""
    return batch_size if dp is None else int(batch_size + 6 * math.sqrt(batch_size) + 16)


class Plan:
    """One fit's DP-SGD for n training rows: q, B, σ and the steps of an epoch, and what each step
    needs (its rows, its noise)."""

    def __init__(self, dp, n, batch_size, seed):
        _library()  # a missing accountant is said before any step
        self.dp, self.n, self.seed = dp, n, seed
        self.q = min(1.0, batch_size / n)
        self.expected = self.q * n  # B: the divisor of every step's sum
        self.steps_per_epoch = max(1, round(n / self.expected))  # an epoch: N rows on average
        self.sigma = dp.noise_multiplier

    def resolve(self, total_epochs):
        """The DP settings with σ: given, or calibrated so that `total_epochs` epochs spend
        target_epsilon (steps spent before are the budget check's business)."""
        if self.sigma is None:
            steps = total_epochs * self.steps_per_epoch
            self.sigma = calibrate(self.q, steps, self.dp.delta, self.dp.target_epsilon)
        return dataclasses.replace(self.dp, noise_multiplier=self.sigma)

    def check_budget(self, spent, steps):
        """PrivacyBudgetError, before any step, if `steps` more steps after the `spent` segments
        would spend more than target_epsilon."""
        budget = self.dp.target_epsilon
        if budget is None or steps == 0:
            return
        eps = epsilon(spend([list(s) for s in spent], self.q, self.sigma, steps), self.dp.delta)
        if eps > budget * (1 + 1e-6):
            now = epsilon(spent, self.dp.delta)
            raise PrivacyBudgetError(
                f"privacy budget: {steps} more steps would spend ε = {eps:.4g} (δ = "
                f"{self.dp.delta:g}, {now:.4g} spent so far), over target_epsilon = {budget:g}; "
                f"train fewer epochs or raise privacy.target_epsilon")

    def rows(self, step):
        """The sorted global indices of step `step`'s batch."""
        return members(self.seed, step, self.n, self.q)

    def noise(self, step):
        """add(grad, start=0, threads=1): the step's noise, σC / B a unit, added to grad, the
        parameters start:start + len(grad) (a sharded update's share)."""
        std = self.sigma * self.dp.max_grad_norm / self.expected
        seed = self.seed
        return lambda grad, start=0, threads=1: add_noise(grad, std, seed, step, start, threads)
