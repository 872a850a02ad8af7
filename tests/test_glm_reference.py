"""A network without hidden layers is a regularized GLM: trained, it reaches scikit-learn's optimum.

`Network([d, k], family=F, l2=lam)` computes the logits z = x Wᵀ + b and minimizes

    mean over samples of NLL_F(z, y)  +  lam ‖W‖²          (the bias is not penalized)

which is, up to a positive factor and a constant, what one of scikit-learn's GLM estimators
minimizes, on the same (standardized) published data:

| family      | scikit-learn estimator and its objective              | the same optimum when |
|-------------|-------------------------------------------------------|-----------------------|
| gaussian    | Ridge: ‖y − Xw − b‖² + α ‖w‖²                         | α = 2 n lam           |
| bernoulli   | LogisticRegression: C Σ log-loss + ½ ‖w‖²             | C = 1 / (2 n lam)     |
| multinomial | LogisticRegression, K classes: C Σ log-loss + ½ ‖W‖²  | C = 1 / (2 n lam)     |
| poisson     | PoissonRegressor: Σ deviance / (2n) + α/2 ‖w‖²        | α = 2 lam             |

(divide Ridge's objective by 2n, the logistic one by C n; half the Poisson deviance is
exp(z) − y z plus a term free of the parameters). The multinomial model has K weight rows, like
the softmax network with K outputs: the penalty makes W unique, while a shift of all K biases by
one constant changes nothing, so biases are compared after centring them (scikit-learn's sum to
zero; so do the network's, which start at zero and get gradients that sum to zero).

The references are exact: Ridge by Cholesky, the others by Newton's method (Newton-CG, Newton-
Cholesky) run until the network's own gradient at their solution is round-off. The network is
trained with its own machinery, a full-batch `Trainer` on one process (and data-parallel on P
ranks under mpiexec): with the whole data set in every step the gradient is exact, so SGD with
heavy-ball momentum at a constant step converges linearly to the optimum itself (no schedule
needed: there is no noise to anneal), and a few hundred steps reach it to round-off.

The tolerance, 1e-8 relative, is orders of magnitude above what training reaches (1e-13 and
below) and orders below what a real bug moves: the penalties are strong enough that doubling
one shifts the weights by 1e-2 or more (the test below asks for 1e-4), and a penalized bias or
a wrong loss moves the weights or the biases as far.
"""

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from mpi4py import MPI
from scipy.special import xlogy
from sklearn import datasets
from sklearn.linear_model import LogisticRegression, PoissonRegressor, Ridge
from sklearn.metrics import log_loss, mean_poisson_deviance

from distnn import Network, SGD, Trainer

TOL = 1e-8  # relative error allowed between the trained network and scikit-learn's optimum


def standardized(X):
    """(X - mean) / std per column; a constant column (digits' blank pixels) becomes zeros."""
    X = np.asarray(X, dtype=np.float64)
    std = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)


def published(name):
    def load():
        X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
        return standardized(X), y
    return load


def linnerud_physiology():
    """Weight, waist and pulse of 20 men from their chin-ups, sit-ups and jumps: 3 outputs."""
    d = datasets.load_linnerud()
    return standardized(d.data), d.target


def linnerud_chins():
    """Chin-ups, a published count, from weight, waist and pulse."""
    d = datasets.load_linnerud()
    return standardized(d.target), d.data[:, 0]


def diabetes_counts():
    """Counts drawn from a log-linear model on the standardized diabetes features (fixed seed)."""
    X = standardized(datasets.load_diabetes().data)
    rng = np.random.default_rng(0)
    beta = rng.normal(0.0, 0.3, X.shape[1])
    return X, rng.poisson(np.exp(0.5 + X @ beta)).astype(np.float64)


@dataclass(frozen=True)
class Case:
    family: str
    load: Callable
    l2: float
    lr: float  # full-batch SGD with heavy-ball momentum: the step ...
    momentum: float  # ... and momentum, set for the problem's curvature
    epochs: int  # = steps: one global batch of the whole data set per epoch
    warmup: int = 0  # Poisson: the rate exp(z) punishes a large first step


CASES = {
    "diabetes-gaussian": Case("gaussian", published("diabetes"), 0.01, 0.5, 0.8, 300),
    "linnerud-gaussian-3-outputs": Case("gaussian", linnerud_physiology, 0.01, 0.5, 0.8, 300),
    "breast_cancer-bernoulli": Case("bernoulli", published("breast_cancer"), 0.01, 2.0, 0.8, 300),
    "iris-multinomial": Case("multinomial", published("iris"), 0.01, 2.0, 0.8, 300),
    "wine-multinomial": Case("multinomial", published("wine"), 0.01, 2.0, 0.8, 300),
    "digits-multinomial": Case("multinomial", published("digits"), 0.01, 2.0, 0.8, 400),
    "linnerud_chins-poisson": Case("poisson", linnerud_chins, 0.01, 0.1, 0.8, 300, warmup=20),
    "diabetes_counts-poisson": Case("poisson", diabetes_counts, 0.01, 0.3, 0.8, 400, warmup=20),
}
ONE_PER_FAMILY = ["diabetes-gaussian", "breast_cancer-bernoulli", "wine-multinomial",
                  "diabetes_counts-poisson"]


@dataclass
class Reference:
    """scikit-learn's optimum as the network lays it out: W (k, d), b (k,), mean response (n, k)."""
    W: np.ndarray
    b: np.ndarray
    mean: np.ndarray
    model: object


def sklearn_optimum(family, X, y, l2):
    """The optimum of the network's objective, found by scikit-learn with the penalty mapped."""
    n = len(X)
    if family == "gaussian":
        model = Ridge(alpha=2 * n * l2, solver="cholesky").fit(X, y)
        mean = model.predict(X)
    elif family in ("bernoulli", "multinomial"):
        model = LogisticRegression(C=1 / (2 * n * l2), solver="newton-cg", tol=1e-14,
                                   max_iter=100).fit(X, y)  # K classes: a softmax, not one-vs-rest
        mean = model.predict_proba(X)
        mean = mean[:, 1:] if family == "bernoulli" else mean
    else:
        model = PoissonRegressor(alpha=2 * l2, solver="newton-cholesky", tol=1e-12,
                                 max_iter=100).fit(X, y)
        mean = model.predict(X)
    W = np.atleast_2d(model.coef_)
    return Reference(W, np.atleast_1d(model.intercept_), mean.reshape(n, -1), model)


@functools.cache
def problem(name):
    """(case, X, y) of a case, loaded once per session (nothing here modifies X or y)."""
    case = CASES[name]
    return (case, *case.load())


@functools.cache
def reference(name, l2=None):
    """sklearn_optimum of a case, at its own l2 unless given, fitted once per session."""
    case, X, y = problem(name)
    return sklearn_optimum(case.family, X, y, case.l2 if l2 is None else l2)


def sklearn_objective(family, ref, X, y, l2):
    """scikit-learn's documented objective at its optimum, divided by its factor and with the
    parameter-free constant removed, so that it is the network's loss (sklearn.metrics' losses)."""
    n, w2 = len(X), float(np.sum(ref.W ** 2))
    if family == "gaussian":
        return (np.sum((y.reshape(n, -1) - ref.mean) ** 2) + 2 * n * l2 * w2) / (2 * n)
    if family in ("bernoulli", "multinomial"):
        C = 1 / (2 * n * l2)
        total_log_loss = log_loss(y, ref.model.predict_proba(X), normalize=False)
        return (C * total_log_loss + w2 / 2) / (C * n)
    # ½ deviance = y log(y/μ) − y + μ = (μ − y log μ) + (y log y − y): the network drops the last
    return mean_poisson_deviance(y, ref.mean[:, 0]) / 2 + l2 * w2 - np.mean(xlogy(y, y) - y)


def identifiable(family, b):
    """Biases up to what the model can tell apart: softmax ignores a shift of all K logits."""
    return b - b.mean() if family == "multinomial" else b


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def net_at(case, X, W, b):
    """The case's network with the given parameters."""
    net = Network([X.shape[1], W.shape[0]], family=case.family, l2=case.l2)
    net.weights[0][...] = W
    net.biases[0][...] = b
    return net


def outputs(family, y):
    """One output per class for softmax, else one per target column."""
    return len(np.unique(y)) if family == "multinomial" else np.reshape(y, (len(y), -1)).shape[1]


def train(case, X, y, comm=MPI.COMM_SELF):
    """The network trained by distnn alone: full-batch SGD with momentum from its default start."""
    net = Network([X.shape[1], outputs(case.family, y)], family=case.family, l2=case.l2, seed=0)
    with Trainer(net, SGD(lr=case.lr, momentum=case.momentum), batch_size=len(X),
                 epochs=case.epochs, comm=comm, schedule={"warmup_steps": case.warmup}) as trainer:
        trainer.fit(X, y)
    return net


def assert_matches(net, ref, family, X, tol=TOL):
    """Coefficients, intercepts and predictions all within `tol`, relative to their size."""
    W, b = net.weights[0], identifiable(family, net.biases[0])
    ref_b = identifiable(family, ref.b)
    weight_err = rel_err(W, ref.W)
    assert weight_err <= tol, f"weights off by {weight_err:.1e} (relative norm)"
    np.testing.assert_allclose(W, ref.W, rtol=tol, atol=tol * np.abs(ref.W).max())
    np.testing.assert_allclose(b, ref_b, rtol=tol, atol=tol * max(np.abs(ref_b).max(), 1.0))
    np.testing.assert_allclose(net.predict(X), ref.mean, rtol=tol,
                               atol=tol * np.abs(ref.mean).max())


# ---- the mapping: scikit-learn's optimum is the network objective's optimum -------------------

@pytest.mark.parametrize("name", CASES)
def test_sklearn_optimum_is_where_the_network_gradient_vanishes_and_the_objectives_agree(name):
    case, X, y = problem(name)
    ref = reference(name)
    net = net_at(case, X, ref.W, ref.b)
    start = Network(net.sizes, family=case.family, l2=case.l2, seed=0)
    assert np.abs(net.gradient(X, y)).max() <= 1e-12 * np.abs(start.gradient(X, y)).max()
    assert net.loss(X, y) == pytest.approx(sklearn_objective(case.family, ref, X, y, case.l2),
                                           rel=1e-12)
    np.testing.assert_allclose(net.predict(X), ref.mean, rtol=1e-12,
                               atol=1e-12 * np.abs(ref.mean).max())


@pytest.mark.parametrize("name", CASES)
def test_the_penalty_is_strong_enough_that_doubling_it_moves_the_optimum_beyond_tolerance(name):
    case, _, _ = problem(name)
    moved = rel_err(reference(name, 2 * case.l2).W, reference(name).W)
    assert moved > 1e4 * TOL


# ---- training reaches it ----------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_full_batch_training_reaches_the_sklearn_optimum(name):
    case, X, y = problem(name)
    net = train(case, X, y)
    assert_matches(net, reference(name), case.family, X)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_data_parallel_training_reaches_the_sklearn_optimum_on_every_rank(name):
    world = MPI.COMM_WORLD
    case, X, y = problem(name)
    net = train(case, X, y, comm=world)
    try:
        assert_matches(net, reference(name), case.family, X)
        failure = None
    except AssertionError as e:
        failure = f"rank {world.rank}: {e}"
    failures = [f for f in world.allgather(failure) if f]  # the same verdict on every rank
    assert not failures, "\n".join(failures)


def test_r2_of_a_perfect_fit_to_constant_targets_is_one_everywhere_it_is_reported():
    # evaluate (Family.scores) and score (Model.score, the estimators) share one R²
    from sklearn.metrics import r2_score
    from distnn import families

    Y = np.full((5, 1), 3.0)
    assert families.FAMILIES["gaussian"].scores(Y, Y.copy())["r2"] == r2_score(Y, Y) == 1.0
    Z = Y + np.arange(5.0)[:, None]
    assert families.FAMILIES["gaussian"].scores(Y, Z)["r2"] == r2_score(Y, Z) == 0.0
