"""Synthetic data sets: KIND -> (labels from X, default parameters), in SYNTHETIC.

X ~ N(0, 1) is drawn first from the seed, then the teacher and the noise, so a source string such as
"synthetic:classification?n=1000&d=10&seed=0" names the same data everywhere (sources.py parses it).
A kind whose parameters include `t` makes sequences: X is (n, t, d) and its generator returns
(labels, lengths or None).
"""
import math

import numpy as np


def _teacher(rng: np.random.Generator, X: np.ndarray, k: int, hidden: int = 32) -> np.ndarray:
    """(N, k) outputs of a random one-hidden-layer tanh MLP, scaled to unit std per output."""
    d = X.shape[1]
    W1 = rng.standard_normal((d, hidden)) / math.sqrt(d)
    b1 = 0.5 * rng.standard_normal(hidden)
    W2 = rng.standard_normal((hidden, k)) / math.sqrt(hidden)
    f = np.tanh(X @ W1 + b1) @ W2
    return (f - f.mean(axis=0)) / f.std(axis=0)


def _classification(rng, X, k):
    """Labels drawn from softmax(3 * teacher): Gumbel-max sampling gives ~Bayes-optimal noise."""
    logits = 3.0 * _teacher(rng, X, k)
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1).astype(np.int64)


def _binary(rng, X):
    """0/1 labels drawn from sigmoid(3 * teacher) via logistic noise."""
    logit = 3.0 * _teacher(rng, X, 1)[:, 0]
    return (logit + rng.logistic(size=logit.shape) > 0).astype(np.int64)


def _regression(rng, X, k, noise):
    """teacher(X) + noise * N(0, 1); (N,) for k = 1, else (N, k). R^2 ceiling 1 / (1 + noise^2)."""
    y = _teacher(rng, X, k) + noise * rng.standard_normal((X.shape[0], k))
    return y[:, 0] if k == 1 else y


def _poisson(rng, X):
    """Counts ~ Poisson(exp(eta)), eta = 0.5 + clip(X w, -2.5, 2.5): rates in [0.14, 20]."""
    w = rng.standard_normal(X.shape[1]) / math.sqrt(X.shape[1])
    eta = 0.5 + np.clip(X @ w, -2.5, 2.5)
    return rng.poisson(np.exp(eta)).astype(np.int64)


def _sequence(rng, X, k, varlen):
    """Class labels of sequences X (n, t, d) from a random tanh teacher RNN's state at each
    sequence's last step, drawn as softmax(3 * teacher) (Gumbel-max); with varlen = 1, lengths
    uniform in [ceil(t / 2), t] and the steps past a sequence's length zeroed."""
    n, t, d = X.shape
    lengths = rng.integers((t + 1) // 2, t + 1, n) if varlen else None
    alive = np.ones((n, t), bool) if lengths is None else np.arange(t) < lengths[:, None]
    X[~alive] = 0.0
    hidden = 16
    Wx = rng.standard_normal((d, hidden)) / math.sqrt(d)
    Wr = 0.9 * rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)  # contracting: no chaos
    Wo = rng.standard_normal((hidden, k)) / math.sqrt(hidden)
    r = np.zeros((n, hidden))
    for s in range(t):  # a finished sequence keeps its last state
        r = np.where(alive[:, s, None], np.tanh(X[:, s] @ Wx + r @ Wr), r)
    f = r @ Wo
    logits = 3.0 * (f - f.mean(axis=0)) / f.std(axis=0)
    labels = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1).astype(np.int64)
    return labels, lengths


# kind -> (generator, default parameters); X ~ N(0, 1) is drawn first, then the teacher and noise.
SYNTHETIC = {
    "classification": (_classification, {"n": 1000, "d": 10, "k": 3, "seed": 0}),
    "binary": (_binary, {"n": 1000, "d": 10, "seed": 0}),
    "regression": (_regression, {"n": 1000, "d": 10, "k": 1, "seed": 0, "noise": 0.1}),
    "poisson": (_poisson, {"n": 1000, "d": 10, "seed": 0}),
    "sequence": (_sequence, {"n": 1000, "t": 10, "d": 4, "k": 3, "seed": 0, "varlen": 0}),
}
