"""Hidden-layer activations in one table, ACTIVATIONS: name -> (forward, derivative through the
forward output, weight initialization).

Every function works in place on preallocated arrays (`out=`), so a training step allocates nothing.
The derivative is written in terms of the forward *output* O = A(Z), which the forward pass already
holds, so backward never recomputes Z. A new activation is one entry in the table.
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

LEAKY_SLOPE = 0.01
_ZERO_ROWS = {}


def _zeros(z):
    """A cached row of zeros to broadcast against z: numpy 2.4's maximum against the scalar 0 runs
    ~3.5x slower than against an array (measured for float32 and float64, small and large)."""
    key = (z.shape[-1], z.dtype)
    row = _ZERO_ROWS.get(key)
    if row is None:
        row = _ZERO_ROWS[key] = np.zeros(z.shape[-1], z.dtype)
        row.flags.writeable = False  # shared by every caller
    return row


def sigmoid(z, out):
    """Logistic function without overflow: exp only ever sees -|z|, tails keep relative precision.

    `out` may be `z` itself (the forward pass works in place)."""
    positive = z >= 0
    e = np.negative(np.abs(z, out=out), out=out)
    np.exp(e, out=e)  # exp(-|z|) in (0, 1]
    np.divide(e, 1 + e, out=e)  # sigmoid(-|z|), accurate however small
    return np.subtract(1, e, out=e, where=positive)  # sigmoid(|z|) = 1 - sigmoid(-|z|) >= 1/2


def softplus(z, out):
    """log(1 + e^z) = max(z, 0) + log1p(e^-|z|), finite for every finite z; `out` may be `z`."""
    positive_part = np.maximum(z, _zeros(z))
    t = np.negative(np.abs(z, out=out), out=out)
    np.exp(t, out=t)
    np.log1p(t, out=t)
    return np.add(t, positive_part, out=out)


def _leaky_relu(z, out):
    if out is not z:
        np.copyto(out, z)
    return np.multiply(out, LEAKY_SLOPE, out=out, where=out < 0)


def _identity(z, out):
    out[...] = z
    return out


def _d_sigmoid(o, out):
    np.subtract(1, o, out=out)
    return np.multiply(out, o, out=out)  # o (1 - o)


def _d_tanh(o, out):
    np.multiply(o, o, out=out)
    return np.subtract(1, out, out=out)  # 1 - o^2


def _d_softplus(o, out):
    # softplus' = sigmoid(z) = 1 - e^{-o}, with o = softplus(z) >= 0
    np.negative(o, out=out)
    np.expm1(out, out=out)
    return np.negative(out, out=out)


def _d_leaky_relu(o, out):
    np.greater(o, 0, out=out, casting="unsafe")  # 1 or 0
    np.multiply(out, 1 - LEAKY_SLOPE, out=out)
    return np.add(out, LEAKY_SLOPE, out=out)  # 1 or slope, exactly: (1 - s) + s rounds to 1


def _relu(z, out):
    return np.maximum(z, _zeros(z), out=out)


def _d_relu(o, out):
    return np.greater(o, 0, out=out, casting="unsafe")


class Activation(NamedTuple):
    """One hidden-layer activation A: its forward pass, derivative and weight initialization."""

    forward: Callable  # (z, out) -> out = A(z); out may be z
    derivative: Callable | None  # (o, out) -> out = A'(z) through o = A(z); None: A' == 1 (no multiply)
    init: str  # "he" for the rectifier family, "glorot" otherwise


ACTIVATIONS = {
    "identity": Activation(_identity, None, "glorot"),
    "relu": Activation(_relu, _d_relu, "he"),
    "leaky_relu": Activation(_leaky_relu, _d_leaky_relu, "he"),
    "tanh": Activation(lambda z, out: np.tanh(z, out=out), _d_tanh, "glorot"),
    "sigmoid": Activation(sigmoid, _d_sigmoid, "glorot"),
    "softplus": Activation(softplus, _d_softplus, "he"),
}

NAMES = tuple(ACTIVATIONS)
