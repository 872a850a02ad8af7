"""Output families: GLM canonical links in one table, FAMILIES: name -> Family (inverse link, loss
from logits, target check, Jacobian, and what a classifier decides). A new family is one entry.

Why one backward recursion serves every family: for an exponential-family likelihood with its
canonical link, the per-sample negative log-likelihood as a function of the logits z is
`A(z) - y·z` (A the log-partition), and A'(z) is the mean. So dLoss/dz = mean - y exactly:
the output proxy error `P_L = O_L - Y` holds for all four entries below.

| family      | mean (inverse link)   | per-sample loss from logits z       | targets                  |
|-------------|-----------------------|-------------------------------------|--------------------------|
| gaussian    | z                     | ½‖z − y‖²                           | real, (N,) or (N, K)     |
| bernoulli   | sigmoid(z)            | softplus(z) − y z                   | 0/1, (N,) or (N, K)      |
| multinomial | softmax(z)            | logsumexp(z) − z_y                  | class labels 0..K−1, (N,)|
| poisson     | exp(z)                | exp(z) − y z   (log y! dropped)     | non-negative, (N,)/(N, K)|

Training's output pass is one compiled kernel per family (kernels.py: `<link>_output`): from the
logits it writes P_L = (mean − y) / divisor, sums the loss and counts correct decisions, and sums
P_L over the batch for the output bias gradient, in one pass. Every loss is computed from the
logits, never from the mean, so it stays finite whenever the true loss is: softmax shifts each
sample by its max logit (exact: softmax is shift-invariant), logsumexp does the same, and softplus
is evaluated as max(z, 0) + log1p(exp(-|z|)). Loss sums are accumulated in float64 whatever the
network dtype; the arrays themselves keep the network's dtype. The kernels take the output layer's
class-major (K, N) arrays (network._Buffers), the targets as check_targets encodes them.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import kernels


def _copy(zt, out):
    np.copyto(out, zt)  # the identity link: the mean is the logits


# Per-sample losses (N,) in float64 from the logits z (N, K), for sample weights (Σ_n w_n ℓ_n):
# the same formulas as the output kernels' summed losses, stable the same way.
def _losses_gaussian(z, y):
    r = z - y
    return 0.5 * np.einsum("ij,ij->i", r, r, dtype=np.float64)


def _losses_bernoulli(z, y):
    return np.sum(np.logaddexp(0, z) - y * z, axis=1, dtype=np.float64)  # softplus(z) - y z


def _losses_multinomial(z, labels):
    shifted = z - z.max(axis=1, keepdims=True)  # the exact shift: exp never overflows
    picked = shifted[np.arange(len(labels)), labels]
    return np.log(np.exp(shifted).sum(axis=1, dtype=np.float64)) - picked.astype(np.float64)


def _losses_poisson(z, y):
    with np.errstate(over="ignore"):
        return np.sum(np.exp(z) - y * z, axis=1, dtype=np.float64)


def _diagonal_jacobian(slope):
    """d mean / d logits for a family whose mean acts output by output: diag(slope(mean))."""
    def jacobian(mean):
        n, k = mean.shape
        jac = np.zeros((n, k, k), dtype=mean.dtype)
        jac[:, np.arange(k), np.arange(k)] += slope(mean)
        return jac
    return jacobian


def _softmax_jacobian(p):
    k = p.shape[1]
    jac = -p[:, :, None] * p[:, None, :]  # diag(p) - p pᵀ
    jac[:, np.arange(k), np.arange(k)] += p
    return jac


def _real(y, k, dtype, name):
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise ValueError(f"{name} targets must be numbers, got dtype {y.dtype}")
    if y.ndim == 1 and k == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != k:
        raise ValueError(f"{name} targets have shape {y.shape}; expected (N, {k})"
                         + (" or (N,)" if k == 1 else ""))
    y = np.ascontiguousarray(y, dtype=dtype)  # the output kernels' layout
    bad = ~np.isfinite(y)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise ValueError(f"{name} targets contain NaN or Inf (first at row {row})")
    return y


def _targets_gaussian(y, k, dtype):
    return _real(y, k, dtype, "gaussian")


def _targets_bernoulli(y, k, dtype):
    y = _real(y, k, dtype, "bernoulli")
    bad = (y != 0) & (y != 1)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"bernoulli targets must be 0 or 1; row {i} has {y[i, j].item()!r}")
    return y


def _targets_poisson(y, k, dtype):
    y = _real(y, k, dtype, "poisson")
    if (y < 0).any():
        i, j = np.argwhere(y < 0)[0]
        raise ValueError(f"poisson targets must be non-negative counts; row {i} has {y[i, j].item()!r}")
    return y


def _targets_multinomial(y, k, dtype):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"multinomial targets must be class labels of shape (N,), got shape {y.shape}")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"multinomial targets must be integer class labels; row {i} has {y[i].item()!r}")
    elif y.dtype.kind not in "biu":
        raise ValueError(f"multinomial targets must be integer class labels, got dtype {y.dtype}")
    labels = y.astype(np.intp)
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"multinomial label {y[i].item()!r} at row {i} is outside 0..{k - 1} "
                         f"(the network has {k} outputs)")
    return labels


def _decide_labels(z):
    return z.argmax(axis=1)  # (N,) output index, the class code


def _decide_bits(z):
    bits = (z > 0).astype(np.int64)  # p > 1/2 exactly when the logit > 0
    return bits[:, 0] if bits.shape[1] == 1 else bits


def r2(Y, mean, weights=None) -> float:
    """R² of each output column, averaged over the columns (scikit-learn's r2_score): 1 -
    SS_res / SS_tot, with SS_tot 0 scoring 1 for a perfect fit and 0 otherwise."""
    w = np.ones(len(Y)) if weights is None else weights
    return r2_of(((w[:, None] * (Y - mean) ** 2).sum(axis=0)), Y, w)


def r2_of(ss_res, Y, w) -> float:
    """R² from the residual sums of squares per column (summed elsewhere: across ranks, say) and
    the targets Y (N, K) with weights w (N,) that give SS_tot."""
    ss_tot = (w[:, None] * (Y - np.average(Y, axis=0, weights=w)) ** 2).sum(axis=0)
    safe = np.where(ss_tot > 0, ss_tot, 1.0)
    return float(np.where(ss_tot > 0, 1 - ss_res / safe, np.where(ss_res == 0, 1.0, 0.0)).mean())


def _r2(Y, z):
    # the identity link makes the logits the mean
    return {"r2": r2(Y.astype(np.float64), z.astype(np.float64))}


def _poisson_deviances(Y, logits):
    """Mean Poisson deviance 2 Σ_k [y log(y/μ) - (y - μ)] per sample, of the model and of the
    intercept-only model (μ = the mean of y); from the logits (log μ), so μ never underflows to 0."""
    Y, z = Y.astype(np.float64), logits.astype(np.float64)

    def deviance(log_mu):
        log_y = np.log(np.where(Y > 0, Y, 1.0))  # y log y -> 0 at y = 0
        return float(2 * (Y * (log_y - log_mu) - Y + np.exp(log_mu)).sum(axis=1).mean())

    mean_y = Y.mean(axis=0)
    null = deviance(np.log(np.where(mean_y > 0, mean_y, np.finfo(np.float64).tiny)))
    return {"deviance": deviance(z), "null_deviance": null}


@dataclass(frozen=True)
class Family:
    """One output family: its kernels, functions and facts. Arrays are (N, K) unless said otherwise;
    the kernels take the class-major transposes (K, N)."""

    output: Callable         # kernel (zt, y, pt, divisor, gb) -> (loss, correct): see the module docstring
    mean: Callable           # kernel (zt, out_t): out = inverse link of the logits, (K, N)
    targets: Callable        # (y, k, dtype) -> y checked and encoded, or ValueError
    jacobian: Callable       # mean -> d mean / d logits per sample, (N, K, K)
    decide: Callable | None = None   # z -> decisions, (N,) or (N, K) ints; None: regression
                                     # (a classifier's output pass counts correct decisions)
    per_output: bool = False         # a classifier deciding each output (else one per sample)
    labels: bool = False     # targets are class labels 0..K-1: one output per class, K >= 2
    scores: Callable | None = None   # regression: (Y, z) -> {metric: value}, the fit's quality
    overflow: str = ""       # warning when the loss is infinite (a mean that overflowed)
    losses: Callable | None = None   # (z, y) -> (N,) float64 per-sample losses: sample weights

    @property
    def is_classifier(self) -> bool:
        return self.decide is not None

    def decisions(self, k) -> int | None:
        """Classification decisions per sample of a K-output network; None for regression."""
        if not self.is_classifier:
            return None
        return k if self.per_output else 1

    def output_pass(self, zt, y, pt, divisor, gb):
        """pt = (mean(zt) - y) / divisor (divisor in the arrays' dtype), gb = Σ_n pt[:, n];
        returns (loss sum, correct count or None for regression)."""
        loss, correct = self.output(zt, y, pt, divisor, gb)
        if self.overflow and not np.isfinite(loss):
            warnings.warn(self.overflow, RuntimeWarning, stacklevel=3)
        return loss, (int(correct) if self.is_classifier else None)


FAMILIES = {
    "gaussian": Family(kernels.identity_output, _copy, _targets_gaussian,
                       _diagonal_jacobian(np.ones_like), scores=_r2, losses=_losses_gaussian),
    "bernoulli": Family(kernels.sigmoid_output, kernels.sigmoid_mean, _targets_bernoulli,
                        _diagonal_jacobian(lambda p: p * (1 - p)),
                        decide=_decide_bits, per_output=True, losses=_losses_bernoulli),
    "multinomial": Family(kernels.softmax_output, kernels.softmax_mean, _targets_multinomial,
                          _softmax_jacobian, decide=_decide_labels, labels=True,
                          losses=_losses_multinomial),
    "poisson": Family(kernels.exp_output, kernels.exp_mean, _targets_poisson,
                      _diagonal_jacobian(lambda m: m), scores=_poisson_deviances,
                      losses=_losses_poisson, overflow="poisson: exp(logit) overflowed, the loss is inf; lower the learning "
                               "rate or standardize the inputs"),
}

NAMES = tuple(FAMILIES)
