"""Hidden-layer activations in one table, ACTIVATIONS: name -> (forward, backward, weight
initialization), each pass a compiled kernel (kernels.py) that works in place.

The forward kernel adds the layer's bias as it applies A: Z = A(Z + b), one pass over (N, H).
The backward kernel multiplies the proxy error by the derivative written in terms of the forward
*output* O = A(Z), which the forward pass already holds (so backward never recomputes Z), and sums
the result over the batch for the layer's bias gradient in the same pass. A new activation is two
kernels and one entry in the table.
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import kernels

LEAKY_SLOPE = kernels.LEAKY_SLOPE


class Activation(NamedTuple):
    """One hidden-layer activation A: its forward and backward kernels and weight initialization."""

    forward: Callable  # (z (N, H), b (H,)): z = A(z + b) in place
    backward: Callable  # (p, o (N, H), gb (H,)): p *= A'(z) through o = A(z); gb = Σ_n p[n]
    init: str  # "he" for the rectifier family, "glorot" otherwise


ACTIVATIONS = {
    "identity": Activation(kernels.identity_forward, lambda p, o, gb: kernels.colsum(p, gb), "glorot"),
    "relu": Activation(kernels.relu_forward, kernels.relu_backward, "he"),
    "leaky_relu": Activation(kernels.leaky_relu_forward, kernels.leaky_relu_backward, "he"),
    "tanh": Activation(kernels.tanh_forward, kernels.tanh_backward, "glorot"),
    "sigmoid": Activation(kernels.sigmoid_forward, kernels.sigmoid_backward, "glorot"),
    "softplus": Activation(kernels.softplus_forward, kernels.softplus_backward, "he"),
}

NAMES = tuple(ACTIVATIONS)


def derivative(name, o):
    """A'(z) through o = A(z), as a new (N, H) array: the backward kernel applied to ones."""
    d = np.ones_like(o)
    ACTIVATIONS[name].backward(d, np.ascontiguousarray(o), np.empty(o.shape[1], o.dtype))
    return d
