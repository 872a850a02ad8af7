"""Random data sets for the tests: features and valid targets for every output family."""

import numpy as np


def random_targets(family, n, k, rng):
    """Valid targets for a network of `family` with k outputs, drawn from rng."""
    return {
        "gaussian": lambda: rng.normal(size=(n, k)),
        "bernoulli": lambda: rng.integers(0, 2, size=(n, k)).astype(float),
        "multinomial": lambda: rng.integers(0, k, size=n),
        "poisson": lambda: rng.poisson(1.0, size=(n, k)).astype(float),
    }[family]()


def problem(family, n, d, k, seed):
    """(X (n, d) standard normal, targets for `family`) from one seed."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, random_targets(family, n, k, rng)
