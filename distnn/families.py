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

Every loss is computed from the logits, never from the mean, so it stays finite whenever the true
loss is: softmax shifts each row by its max (exact: softmax is shift-invariant), logsumexp does the
same, and softplus is evaluated as max(z, 0) + log1p(exp(-|z|)). Loss sums are accumulated in
float64 whatever the network dtype; the arrays themselves keep the network's dtype.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .activations import sigmoid, softplus


def _softmax(z, out):
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)  # exact shift: the max logit becomes 0
    np.exp(out, out=out)
    return np.divide(out, out.sum(axis=1, keepdims=True), out=out)


def _exp(z, out):
    with np.errstate(over="ignore"):
        np.exp(z, out=out)
    return out


def _identity(z, out):
    out[...] = z
    return out


def _loss_gaussian(z, y):
    r = z - y
    return 0.5 * float(np.einsum("ij,ij->", r, r, dtype=np.float64))


def _loss_bernoulli(z, y):
    return float(np.sum(softplus(z, np.empty_like(z)) - y * z, dtype=np.float64))


def _loss_multinomial(z, labels):
    # the same log-sum-exp as training's fused pass, into a scratch mean
    return _softmax_and_loss(z, labels, np.empty_like(z))


def _loss_poisson(z, y):
    with np.errstate(over="ignore"):
        total = float(np.sum(np.exp(z) - y * z, dtype=np.float64))
    if not np.isfinite(total):
        warnings.warn("poisson: exp(logit) overflowed, the loss is inf; lower the learning rate "
                      "or standardize the inputs", RuntimeWarning, stacklevel=3)
    return total


def _losses_gaussian(z, y):
    r = z - y
    return 0.5 * np.einsum("ij,ij->i", r, r, dtype=np.float64)


def _losses_bernoulli(z, y):
    return np.sum(softplus(z, np.empty_like(z)) - y * z, axis=1, dtype=np.float64)


def _losses_multinomial(z, labels):
    shifted = z - z.max(axis=1, keepdims=True)  # the same exact shift as the summed loss
    picked = shifted[np.arange(len(labels)), labels]
    return (np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
            - picked.astype(np.float64))


def _losses_poisson(z, y):
    with np.errstate(over="ignore"):
        return np.sum(np.exp(z) - y * z, axis=1, dtype=np.float64)


def _softmax_and_loss(z, labels, out):
    """out = softmax(z); returns the loss sum. Softmax and its loss share one pass: with the row max
    m and s = Σ exp(z - m), p = exp(z - m) / s and the loss is Σ log s - (z_y - m)."""
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)  # (N, K), each row's max is 0
    picked = out[np.arange(len(labels)), labels]  # z_y - m, (N,)
    np.exp(out, out=out)
    s = out.sum(axis=1, keepdims=True)  # in [1, K]: its log is finite
    np.divide(out, s, out=out)
    return float(np.log(s).sum(dtype=np.float64) - picked.sum(dtype=np.float64))


def _subtract(out, y):
    return np.subtract(out, y, out=out)


def _subtract_one_hot(out, labels):
    out[np.arange(len(labels)), labels] -= 1  # labels act as one-hot rows
    return out


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


def _correct_labels(z, labels):
    return int(np.count_nonzero(z.argmax(axis=1) == labels))


def _correct_bits(z, y):
    return int(np.count_nonzero((z > 0) == (y > 0.5)))  # p > 1/2 exactly when the logit > 0


def _real(y, k, dtype, name):
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise ValueError(f"{name} targets must be numbers, got dtype {y.dtype}")
    if y.ndim == 1 and k == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != k:
        raise ValueError(f"{name} targets have shape {y.shape}; expected (N, {k})"
                         + (" or (N,)" if k == 1 else ""))
    y = y.astype(dtype, copy=False)
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


def _r2(Y, z):
    """1 - SS_res / SS_tot per output column, averaged over the columns (sklearn's default); the
    identity link makes the logits the mean."""
    Y, mean = Y.astype(np.float64), z.astype(np.float64)
    ss_res = ((Y - mean) ** 2).sum(axis=0)
    ss_tot = ((Y - Y.mean(axis=0)) ** 2).sum(axis=0)
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), 0.0)
    return {"r2": float(r2.mean())}


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
    """One output family: its functions and facts. Arrays are (N, K) unless said otherwise."""

    mean: Callable           # (z, out) -> out = inverse link of the logits
    loss_sum: Callable       # (z, y) -> float sum of per-sample losses, from the logits
    targets: Callable        # (y, k, dtype) -> y checked and encoded, or ValueError
    jacobian: Callable       # mean -> d mean / d logits per sample, (N, K, K)
    subtract: Callable = _subtract  # (out, y): out -= y in place, the output proxy error
    fused: Callable | None = None   # (z, y, out) -> loss, out = mean in one pass; None: two
    correct: Callable | None = None  # (z, y) -> count decided right; None: regression
    decide: Callable | None = None   # z -> decisions, (N,) or (N, K) ints; None: regression
    per_output: bool = False         # a classifier deciding each output (else one per sample)
    labels: bool = False     # targets are class labels 0..K-1: one output per class, K >= 2
    scores: Callable | None = None   # regression: (Y, z) -> {metric: value}, the fit's quality
    losses: Callable | None = None   # (z, y) -> (N,) float64 per-sample losses: sample weights

    @property
    def is_classifier(self) -> bool:
        return self.correct is not None

    def decisions(self, k) -> int | None:
        """Classification decisions per sample of a K-output network; None for regression."""
        if not self.is_classifier:
            return None
        return k if self.per_output else 1

    def correct_count(self, z, y):
        """How many decisions from the logits z are right; None for regression."""
        return None if self.correct is None else self.correct(z, y)

    def mean_and_loss(self, z, y, out):
        """out = mean(z); returns the loss sum."""
        if self.fused is not None:
            return self.fused(z, y, out)
        self.mean(z, out)
        return self.loss_sum(z, y)

    def loss_and_residual(self, z, y, out):
        """Training's output pass: out = P_L = mean(z) - y; returns the loss sum."""
        loss = self.mean_and_loss(z, y, out)
        self.subtract(out, y)
        return loss

    def residual(self, mean, y, out):
        """out = mean - y, the output proxy error P_L."""
        np.copyto(out, mean)
        return self.subtract(out, y)


FAMILIES = {
    "gaussian": Family(_identity, _loss_gaussian, _targets_gaussian,
                       _diagonal_jacobian(np.ones_like), scores=_r2,
                       losses=_losses_gaussian),
    "bernoulli": Family(sigmoid, _loss_bernoulli, _targets_bernoulli,
                        _diagonal_jacobian(lambda p: p * (1 - p)), correct=_correct_bits,
                        decide=_decide_bits, per_output=True,
                        losses=_losses_bernoulli),
    "multinomial": Family(_softmax, _loss_multinomial, _targets_multinomial, _softmax_jacobian,
                          subtract=_subtract_one_hot, fused=_softmax_and_loss,
                          correct=_correct_labels, decide=_decide_labels, labels=True,
                          losses=_losses_multinomial),
    "poisson": Family(_exp, _loss_poisson, _targets_poisson, _diagonal_jacobian(lambda m: m),
                      scores=_poisson_deviances, losses=_losses_poisson),
}

NAMES = tuple(FAMILIES)
