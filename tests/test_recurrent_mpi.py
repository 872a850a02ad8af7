"""Recurrent networks trained data-parallel: P ranks compute what 1 rank computes (to round-off, and
to the bit in deterministic mode); an interrupted run resumes bit-identically; a NaN stops every rank.

Run with `mpiexec -n 2 python -m pytest --only-mpi tests/test_recurrent_mpi.py` (and -n 3). Each
test computes its own 1-rank reference on COMM_SELF; verdicts are combined across ranks first.
"""

import hashlib
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

from distnn import optim
from distnn.checkpoint import latest_checkpoint
from distnn.recurrent import Recurrent
from distnn.trainer import DivergenceError, Interrupted, Trainer

WORLD = MPI.COMM_WORLD
pytestmark = pytest.mark.mpi(min_size=2)


def all_ranks(ok):
    return WORLD.allreduce(bool(ok), op=MPI.LAND)


def same_everywhere(*arrays):
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return len(set(WORLD.allgather(hashlib.sha256(mine).hexdigest()))) == 1


def without_time(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def problem(targets, n=47, t=6, d=3, seed=0):
    """Sequences of varied lengths (garbage beyond them) and two-class targets."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, t, d))
    lengths = rng.integers(1, t + 1, size=n)
    y = (np.cumsum(X[:, :, 0], axis=1) > 0).astype(int)  # (N, T): the sign of a running sum
    if targets == "last":
        y = y[np.arange(n), lengths - 1]
    X[np.arange(t)[None, :] >= lengths[:, None]] = np.nan
    return X, y, lengths


def train(comm, targets="every", *, opt="adam", dtype=np.float64, epochs=4, bptt=0, **kw):
    X, y, lengths = problem(targets)
    rnn = Recurrent([3, 7, 2], 4, activation="tanh", family="multinomial", targets=targets,
                    l2=1e-3, dtype=dtype, seed=1)
    make = {"adam": lambda: optim.Adam(lr=0.02),
            "momentum": lambda: optim.SGD(lr=0.1, momentum=0.9)}[opt]
    trainer = Trainer(rnn, make(), batch_size=10, epochs=epochs, seed=2, comm=comm, bptt=bptt,
                      clip_norm=kw.pop("clip_norm", 1.0), **kw)
    history = trainer.fit(X, y, X[:13], y[:13], lengths=lengths, lengths_val=lengths[:13])
    return trainer, history


@pytest.mark.parametrize("targets", ["last", "every"])
@pytest.mark.parametrize("opt, update, bptt", [("adam", "sharded", 0), ("momentum", "whole", 2)])
def test_p_ranks_train_like_one_rank(targets, opt, update, bptt):
    """Uneven shards of sequences of varied lengths, a last batch of 7; clipping on."""
    world, world_hist = train(WORLD, targets, opt=opt, update=update, bptt=bptt)
    single, single_hist = train(MPI.COMM_SELF, targets, opt=opt, bptt=bptt)
    assert world.step == single.step == 4 * 5
    rel = np.abs(world.net.params - single.net.params).max() / np.abs(single.net.params).max()
    assert all_ranks(rel <= 1e-10), rel
    assert all_ranks(same_everywhere(world.net.params))
    for a, b in zip(world_hist, single_hist):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert all_ranks(abs(a[key] - b[key]) <= 1e-10 * abs(b[key])), key


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("targets", ["last", "every"])
def test_deterministic_mode_gives_the_bits_of_one_rank(dtype, targets):
    """Chunks of 3 sequences summed on the grid: the same bits on P ranks as on one."""
    world, world_hist = train(WORLD, targets, dtype=dtype, deterministic=True, chunk_size=3)
    single, single_hist = train(MPI.COMM_SELF, targets, dtype=dtype, deterministic=True,
                                chunk_size=3)
    assert all_ranks(world.net.params.tobytes() == single.net.params.tobytes())
    assert all_ranks(without_time(world_hist) == without_time(single_hist))
    plain, _ = train(MPI.COMM_SELF, targets, dtype=dtype)  # and near the default mode's sum
    rel = np.abs(world.net.params - plain.net.params).max() / np.abs(plain.net.params).max()
    assert all_ranks(rel <= (1e-10 if dtype == np.float64 else 1e-3)), rel


@pytest.mark.parametrize("deterministic", [False, True])
def test_an_interrupted_run_resumes_bit_identically(deterministic):
    """request_stop on one rank mid-epoch: every rank stops after that step and checkpoints;
    Trainer.resume rebuilds the Recurrent (and its bptt) and ends where an unbroken run ends."""
    straight, straight_hist = train(WORLD, bptt=3, deterministic=deterministic, chunk_size=4)
    directory = WORLD.bcast(tempfile.mkdtemp(prefix="distnn-test-") if WORLD.rank == 0 else None)
    stopped, _ = train(WORLD, epochs=0, bptt=3, deterministic=deterministic, chunk_size=4,
                       checkpoint_dir=directory)
    stopped.epochs = 4
    train_batch = stopped.train_batch

    def stop_before_step_9(*args, **kwargs):
        # asked on the last rank alone, whether or not it holds rows of this batch (with more
        # ranks than chunks it holds none, and its gradient is never computed)
        if stopped.step == 8 and WORLD.rank == WORLD.size - 1:
            stopped.request_stop()
        return train_batch(*args, **kwargs)

    stopped.train_batch = stop_before_step_9
    X, y, lengths = problem("every")
    with pytest.raises(Interrupted):
        stopped.fit(X, y, X[:13], y[:13], lengths=lengths, lengths_val=lengths[:13])
    assert all_ranks(stopped.step == 9)  # asked before step 9: that step carries it
    resumed = Trainer.resume(latest_checkpoint(directory), comm=WORLD, checkpoint_dir=None)
    assert all_ranks(isinstance(resumed.net, Recurrent) and resumed.bptt == 3 and resumed.step == 9)
    history = resumed.fit(X, y, X[:13], y[:13], lengths=lengths, lengths_val=lengths[:13])
    assert all_ranks(resumed.net.params.tobytes() == straight.net.params.tobytes())
    assert all_ranks(without_time(history) == without_time(straight_hist))


def test_a_nan_in_one_ranks_gradient_stops_every_rank_unchanged():
    X, y, lengths = problem("every")
    rnn = Recurrent([3, 7, 2], 4, family="multinomial", targets="every", seed=1)
    trainer = Trainer(rnn, optim.Adam(lr=0.01), batch_size=10, epochs=1, comm=WORLD)
    calls, grad_sum, before = [0], rnn.grad_sum, {}

    def nan_at_the_third_step(X_, Y_, out, *args, **kwargs):
        loss = grad_sum(X_, Y_, out, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            before["params"] = rnn.params.copy()
            if WORLD.rank == 0:
                out[0] = np.nan
        return loss

    rnn.grad_sum = nan_at_the_third_step
    with pytest.raises(DivergenceError, match="step 3"):
        trainer.fit(X, y, lengths=lengths)
    assert all_ranks(np.array_equal(rnn.params, before["params"]))
    assert all_ranks(same_everywhere(rnn.params))


def test_bad_lengths_on_any_rank_fail_every_rank_in_one_line():
    X, y, lengths = problem("every")
    lengths = lengths.copy()
    lengths[-1] = 9  # beyond T = 6
    rnn = Recurrent([3, 2], 2, family="multinomial", targets="every")
    trainer = Trainer(rnn, batch_size=10, epochs=1, comm=WORLD)
    with pytest.raises(ValueError, match="outside 1..6"):
        trainer.fit(X, y, lengths=lengths)
