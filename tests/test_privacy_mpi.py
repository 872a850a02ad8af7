"""DP-SGD over P ranks: what 1 rank computes, to round-off (default, sharded or whole update) and
to the bit (deterministic mode); the batch and the noise alike on every rank; for a Network and a
Recurrent.

Run with `mpiexec -n 2 python -m pytest -q --only-mpi tests/test_privacy_mpi.py` (and -n 3). Each
test computes its 1-rank reference on COMM_SELF; verdicts are combined across ranks first."""
import numpy as np
import pytest
from mpi4py import MPI

from distnn import Network, optim, privacy
from distnn import recurrent
from distnn.recurrent import Recurrent
from distnn.privacy import DP
from distnn.trainer import Trainer

import problems

WORLD = MPI.COMM_WORLD
pytestmark = pytest.mark.mpi(min_size=2)


def all_ranks(ok):
    return WORLD.allreduce(bool(ok), op=MPI.LAND)


def same_on_every_rank(a):
    a = np.ascontiguousarray(a)
    return all_ranks(all(np.array_equal(a, b) for b in WORLD.allgather(a)))


def fit(comm, family="multinomial", epochs=3, batch_size=9, **kw):
    X, y = problems.problem(family, 90, 5, 3, seed=0)
    net = Network([5, 8, 3], activation="tanh", family=family, l1=1e-3, l2=1e-3, seed=1)
    trainer = Trainer(net, optim.Adam(lr=0.01), batch_size=batch_size, epochs=epochs, seed=2, comm=comm,
                      privacy=DP(noise_multiplier=0.8, max_grad_norm=0.3, noise_seed=7), **kw)
    trainer.fit(X, y)
    return trainer


@pytest.mark.parametrize("update", ["sharded", "whole"])
@pytest.mark.parametrize("family, batch_size", [("multinomial", 9), ("gaussian", 9),
                                                ("multinomial", 1)])
def test_p_ranks_train_the_parameters_of_one_to_1e_10(update, family, batch_size):
    """Poisson batches of ~9 rows (or ~1: most ranks hold none) over P ranks, clipped, noised,
    each rank adding the noise of its share (sharded) or all of it (whole): the parameters of
    one rank; every rank's the same bits."""
    one = fit(MPI.COMM_SELF, family, batch_size=batch_size)
    many = fit(WORLD, family, batch_size=batch_size, update=update)
    assert all_ranks(many.stepper.sharded == (update == "sharded"))
    ok = np.allclose(many.net.params, one.net.params, rtol=1e-10, atol=1e-12)
    assert all_ranks(ok)
    assert same_on_every_rank(many.net.params)
    assert all_ranks(many.history[-1]["epsilon"] == one.history[-1]["epsilon"])


def test_deterministic_private_training_is_bit_identical_for_any_rank_count():
    one = fit(MPI.COMM_SELF, deterministic=True, chunk_size=2)
    many = fit(WORLD, deterministic=True, chunk_size=2)
    assert all_ranks(np.array_equal(many.net.params, one.net.params))


def test_without_a_noise_seed_the_ranks_share_rank_zeros_secret_key():
    """The secret key is drawn once, on rank 0, and broadcast: every rank draws the same batches
    and noise (the parameters agree, checked by the trainer too)."""
    X, y = problems.problem("multinomial", 90, 5, 3, seed=0)
    t = Trainer(Network([5, 8, 3], seed=1), optim.SGD(lr=0.1), batch_size=9, epochs=1, seed=2,
                comm=WORLD, privacy=DP(noise_multiplier=1.0))
    t.fit(X, y)
    assert same_on_every_rank(np.array([t.noise_key % 2**62, t.noise_key >> 66], np.int64))
    assert same_on_every_rank(t.net.params)


def test_membership_and_noise_are_the_same_on_every_rank_and_shares_draw_their_slice():
    rows = privacy.members(3, 17, 10_000, 0.01)
    assert same_on_every_rank(rows)
    n = 2 * privacy.BLOCK + 999
    whole = privacy.add_noise(np.zeros(n), 1.0, 3, 17)
    assert same_on_every_rank(whole)
    lo, hi = n * WORLD.rank // WORLD.size, n * (WORLD.rank + 1) // WORLD.size
    mine = privacy.add_noise(np.zeros(hi - lo), 1.0, 3, 17, start=lo)
    parts = WORLD.allgather(mine)
    assert all_ranks(np.array_equal(np.concatenate(parts), whole))


def fit_recurrent(comm, targets, bptt=0, **kw):
    """A private Recurrent on sequences of lengths 1..6 (NaN beyond them), ~8 sequences a step."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 6, 3))
    lengths = rng.integers(1, 7, size=60)
    y = (np.cumsum(X[:, :, 0], axis=1) > 0).astype(int)  # (N, T): the sign of a running sum
    if targets == "last":
        y = y[np.arange(60), lengths - 1]
    X[np.arange(6)[None, :] >= lengths[:, None]] = np.nan
    rnn = Recurrent([3, 5, 2], 4, activation="tanh", targets=targets, l2=1e-3, seed=1)
    trainer = Trainer(rnn, optim.Adam(lr=0.02), batch_size=8, epochs=3, seed=2, comm=comm,
                      bptt=bptt, privacy=DP(noise_multiplier=0.8, max_grad_norm=0.3, noise_seed=7),
                      **kw)
    trainer.fit(X, y, lengths=lengths)
    return trainer


@pytest.mark.parametrize("targets, bptt, update", [("every", 0, "sharded"), ("last", 2, "whole")])
def test_a_private_recurrent_on_p_ranks_trains_the_parameters_of_one_to_1e_10(targets, bptt,
                                                                             update):
    one = fit_recurrent(MPI.COMM_SELF, targets, bptt)
    many = fit_recurrent(WORLD, targets, bptt, update=update)
    assert all_ranks(np.allclose(many.net.params, one.net.params, rtol=1e-10, atol=1e-12))
    assert same_on_every_rank(many.net.params)
    assert all_ranks(np.allclose([r["loss"] for r in many.history],
                                 [r["loss"] for r in one.history], rtol=1e-10))
    assert all_ranks(many.history[-1]["epsilon"] == one.history[-1]["epsilon"])


@pytest.mark.parametrize("targets, norms", [("last", "cost"), ("every", "cost"),
                                             ("every", "formed")])
def test_deterministic_private_recurrent_training_is_bit_identical_for_any_rank_count(
        monkeypatch, targets, norms):
    """Chunks of 2 sequences, their norms by the Gram kernel (what the cost picks at T = 6) or
    by each gradient formed in BLAS (pinned to the same threads on every rank)."""
    if norms == "formed":
        monkeypatch.setattr(recurrent, "_layer_sq_norms", recurrent._formed_sq_norms)
    one = fit_recurrent(MPI.COMM_SELF, targets, deterministic=True, chunk_size=2)
    many = fit_recurrent(WORLD, targets, deterministic=True, chunk_size=2)
    assert all_ranks(np.array_equal(many.net.params, one.net.params))
