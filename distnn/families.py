"""Output families: GLM canonical links as name -> (inverse link, loss from logits, target check).

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


MEAN = {"gaussian": _identity, "bernoulli": sigmoid, "multinomial": _softmax, "poisson": _exp}


def _loss_gaussian(z, y):
    r = z - y
    return 0.5 * float(np.einsum("ij,ij->", r, r, dtype=np.float64))


def _loss_bernoulli(z, y):
    return float(np.sum(softplus(z, np.empty_like(z)) - y * z, dtype=np.float64))


def _loss_multinomial(z, labels):
    # the same log-sum-exp as training's fused pass (mean_and_loss_sum), into a scratch mean
    return mean_and_loss_sum("multinomial", z, labels, np.empty_like(z))


def _loss_poisson(z, y):
    with np.errstate(over="ignore"):
        total = float(np.sum(np.exp(z) - y * z, dtype=np.float64))
    if not np.isfinite(total):
        warnings.warn("poisson: exp(logit) overflowed, the loss is inf; lower the learning rate "
                      "or standardize the inputs", RuntimeWarning, stacklevel=3)
    return total


LOSS_SUM = {"gaussian": _loss_gaussian, "bernoulli": _loss_bernoulli,
            "multinomial": _loss_multinomial, "poisson": _loss_poisson}


def mean_and_loss_sum(family, z, y, out):
    """out = mean(z); returns the loss sum. Softmax and its loss share one pass: with the row max
    m and s = Σ exp(z - m), p = exp(z - m) / s and the loss is Σ log s - (z_y - m)."""
    if family != "multinomial":
        MEAN[family](z, out)
        return LOSS_SUM[family](z, y)
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)  # (N, K), each row's max is 0
    picked = out[np.arange(len(y)), y]  # z_y - m, (N,)
    np.exp(out, out=out)
    s = out.sum(axis=1, keepdims=True)  # in [1, K]: its log is finite
    np.divide(out, s, out=out)
    return float(np.log(s).sum(dtype=np.float64) - picked.sum(dtype=np.float64))


def loss_and_residual(family, z, y, mean, out):
    """Training's output pass: out = P_L = mean(z) - y; returns the loss sum. Multinomial writes
    its softmax straight into out and subtracts the one-hot there (`mean` is left as it was)."""
    if family != "multinomial":
        loss = mean_and_loss_sum(family, z, y, mean)
        np.subtract(mean, y, out=out)
        return loss
    loss = mean_and_loss_sum(family, z, y, out)
    out[np.arange(len(y)), y] -= 1
    return loss


def residual(family, mean, y, out):
    """out = mean - y, the output proxy error P_L; multinomial labels act as one-hot rows."""
    np.copyto(out, mean)
    if family == "multinomial":
        out[np.arange(len(y)), y] -= 1
    else:
        np.subtract(out, y, out=out)
    return out


def correct_count(family, z, y):
    """Number of correctly classified samples from the logits; None for regression families."""
    if family == "multinomial":
        return int(np.count_nonzero(z.argmax(axis=1) == y))
    if family == "bernoulli":
        return int(np.count_nonzero((z > 0) == (y > 0.5)))
    return None


def mean_jacobian(family, mean):
    """d mean / d logits per sample, (N, K, K): how the Jacobians start their recursion."""
    n, k = mean.shape
    if family == "multinomial":
        jac = -mean[:, :, None] * mean[:, None, :]  # diag(p) - p pᵀ
    else:
        jac = np.zeros((n, k, k), dtype=mean.dtype)
    diag = {"gaussian": np.ones_like(mean), "bernoulli": mean * (1 - mean),
            "multinomial": mean, "poisson": mean}[family]
    jac[:, np.arange(k), np.arange(k)] += diag
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


TARGETS = {"gaussian": _targets_gaussian, "bernoulli": _targets_bernoulli,
           "multinomial": _targets_multinomial, "poisson": _targets_poisson}

NAMES = tuple(MEAN)
