"""The estimators under mpiexec: P ranks fit what 1 rank fits, every rank ends alike, each rank
computes only its shard of each batch, and a grid search runs in lock-step.

Run with `mpiexec -n 2 python -m pytest --only-mpi tests/test_estimators_mpi.py` (and -n 3).
Each test fits its own 1-rank reference on COMM_SELF; verdicts are combined across ranks.
"""
import hashlib
import warnings

import numpy as np
import pytest
from mpi4py import MPI

pytest.importorskip("sklearn")
from sklearn.datasets import load_breast_cancer, load_digits, make_regression  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402

from distnn import MLPClassifier, MLPRegressor  # noqa: E402
from distnn.network import Network  # noqa: E402

WORLD, SELF = MPI.COMM_WORLD, MPI.COMM_SELF
pytestmark = [pytest.mark.mpi(min_size=2),
              pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]


def all_ranks(ok):
    return WORLD.allreduce(bool(ok), op=MPI.LAND)


def same_everywhere(*arrays):
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return len(set(WORLD.allgather(hashlib.sha256(mine).hexdigest()))) == 1


def digits(n=600):
    X, y = load_digits(return_X_y=True)
    return X[:n] / 16, y[:n]


def params(est):
    return np.concatenate([a.ravel() for a in est.coefs_ + est.intercepts_])


def both(make, X, y, **fit):
    """(fitted on COMM_WORLD, fitted on COMM_SELF) from the same parameters."""
    return make(comm=WORLD).fit(X, y, **fit), make(comm=SELF).fit(X, y, **fit)


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_p_ranks_fit_what_one_rank_fits_and_every_rank_ends_alike(solver):
    X, y = digits()
    w = np.random.default_rng(0).integers(0, 3, len(X))
    world, one = both(lambda **c: MLPClassifier(hidden_layer_sizes=(16,), solver=solver,
                                                batch_size=64, max_iter=6, random_state=1, **c),
                      X, y, sample_weight=w)
    assert all_ranks(same_everywhere(params(world)))
    assert all_ranks(np.allclose(params(world), params(one), rtol=1e-10, atol=1e-12))
    assert all_ranks(np.allclose(world.loss_curve_, one.loss_curve_, rtol=1e-10))


def test_deterministic_mode_gives_the_bits_of_one_rank():
    X, y = make_regression(n_samples=300, n_features=6, random_state=0)
    y = y / y.std()
    world, one = both(lambda **c: MLPRegressor(hidden_layer_sizes=(8,), batch_size=50,
                                               max_iter=5, deterministic=True, chunk_size=16,
                                               early_stopping=True, random_state=2, **c), X, y)
    assert all_ranks(params(world).tobytes() == params(one).tobytes())
    assert all_ranks(world.validation_scores_ == one.validation_scores_)


def test_early_stopping_stops_every_rank_after_the_same_epoch_as_one_rank():
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    world, one = both(lambda **c: MLPClassifier(hidden_layer_sizes=(8,), early_stopping=True,
                                                n_iter_no_change=2, max_iter=80,
                                                learning_rate_init=0.01, random_state=3, **c),
                      X, y)
    assert all_ranks(world.n_iter_ == one.n_iter_ < 80)
    assert all_ranks(np.allclose(world.validation_scores_, one.validation_scores_, rtol=1e-12))
    assert all_ranks(same_everywhere(params(world)))


def test_each_rank_computes_only_its_shard_of_every_batch(monkeypatch):
    X, y = digits()
    rows = [0]
    grad_sum = Network.grad_sum

    def counting(self, X_, *args, **kwargs):
        rows[0] += len(X_)
        return grad_sum(self, X_, *args, **kwargs)

    monkeypatch.setattr(Network, "grad_sum", counting)
    MLPClassifier(hidden_layer_sizes=(8,), batch_size=100, max_iter=2, random_state=0).fit(X, y)
    counts = WORLD.allgather(rows[0])
    assert all_ranks(sum(counts) == 2 * len(X) and max(counts) - min(counts) <= 2 * 6)


def test_random_state_none_is_drawn_once_for_every_rank():
    X, y = digits(300)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2).fit(X, y)
    assert all_ranks(same_everywhere(params(clf)))


def test_a_grid_search_runs_in_lock_step_and_picks_what_one_rank_picks():
    X, y = digits(400)
    grid = {"hidden_layer_sizes": [(4,), (16,)], "l2": [0.0, 1e-2]}

    def search(comm):
        est = MLPClassifier(max_iter=8, learning_rate_init=0.01, random_state=0, comm=comm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GridSearchCV(est, grid, cv=3).fit(X, y)

    world, one = search(WORLD), search(SELF)
    assert all_ranks(world.best_params_ == one.best_params_)
    assert all_ranks(np.allclose(world.cv_results_["mean_test_score"],
                                 one.cv_results_["mean_test_score"], rtol=1e-12))
    assert all_ranks(same_everywhere(params(world.best_estimator_)))
