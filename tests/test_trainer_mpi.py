"""Data-parallel training: P ranks compute what 1 rank computes; ranks stay bit-identical; resume.

Run with `mpiexec -n 2 python -m pytest --with-mpi tests/test_trainer_mpi.py` (and -n 3). Each test
computes its own 1-rank reference on COMM_SELF, and every rank-dependent verdict is combined across
ranks before asserting, so a failure fails on all ranks instead of hanging the next collective.
"""

import hashlib
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

from distnn import Network, optim
from distnn.checkpoint import CheckpointError, list_checkpoints
from distnn.trainer import Trainer

import problems

WORLD = MPI.COMM_WORLD
pytestmark = pytest.mark.mpi(min_size=2)


def all_ranks(ok):
    """True only if `ok` holds on every rank (so all ranks assert the same verdict)."""
    return WORLD.allreduce(bool(ok), op=MPI.LAND)


def without_time(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def shared_dir():
    return WORLD.bcast(tempfile.mkdtemp(prefix="distnn-test-") if WORLD.rank == 0 else None)


def problem(family, n=51, d=5, k=3, seed=0):
    return problems.problem(family, n, d, k, seed)


OPTIMIZERS = {"momentum": lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
              "adam": lambda: optim.Adam(lr=0.01)}


def train(comm, family, opt, *, batch_size=10, epochs=7, **kw):
    X, y = problem(family)
    net = Network([5, 8, 3], activation="tanh", family=family, l1=1e-3, l2=1e-3, seed=1)
    trainer = Trainer(net, OPTIMIZERS[opt](), batch_size=batch_size, epochs=epochs, seed=2,
                      comm=comm, **kw)
    history = trainer.fit(X, y, X[:13], y[:13])
    return trainer, history


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_each_rank_updating_its_share_gives_the_bits_of_every_rank_updating_all(opt):
    """On one node each rank updates its slice of the parameters and optimizer state after the
    shared-memory sum; the result, state included, equals the whole update on every rank."""
    sharded, _ = train(WORLD, "multinomial", opt, update="sharded")
    assert all_ranks(sharded.stepper.sharded)
    whole, _ = train(WORLD, "multinomial", opt, update="whole")
    assert all_ranks(not whole.stepper.sharded)
    same = sharded.net.params.tobytes() == whole.net.params.tobytes()
    state, expected = sharded.optimizer.state_dict(), whole.optimizer.state_dict()
    assert all_ranks(same and all(state[k].tobytes() == expected[k].tobytes() for k in expected))


def test_clipping_the_shares_by_their_global_norm_matches_clipping_the_whole_gradient():
    """Each rank clips its share by the norm of all shares: the whole gradient's, to round-off."""
    free, _ = train(WORLD, "multinomial", "momentum")
    sharded, _ = train(WORLD, "multinomial", "momentum", clip_norm=0.05, update="sharded")
    whole, _ = train(WORLD, "multinomial", "momentum", clip_norm=0.05, update="whole")
    assert all_ranks(sharded.stepper.sharded and same_everywhere(sharded.net.params))
    assert all_ranks(np.allclose(sharded.net.params, whole.net.params, rtol=1e-11, atol=1e-14))
    assert not np.allclose(sharded.net.params, free.net.params, rtol=1e-3)  # clipping acted


def same_everywhere(*arrays):
    """True on every rank iff every array has the same bytes on every rank."""
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return len(set(WORLD.allgather(hashlib.sha256(mine).hexdigest()))) == 1


def test_a_nan_in_one_ranks_share_of_the_sum_leaves_every_rank_unchanged_and_alike(monkeypatch):
    """No rank updates its share before every share of the sum is known to be finite."""
    from distnn.trainer import DivergenceError
    X, y = problem("multinomial")
    net = Network([5, 8, 3], activation="tanh", l2=1e-3, seed=1)
    trainer = Trainer(net, optim.Adam(lr=0.01), batch_size=10, epochs=1, seed=2, comm=WORLD)
    calls, grad_sum, before = [0], net.grad_sum, {}

    def nan_at_the_fourth_step(X_, Y_, out, divisor=1, weights=None):
        loss = grad_sum(X_, Y_, out, divisor, weights)
        calls[0] += 1
        if calls[0] == 4:
            before.update(params=net.params.copy(), t=trainer.optimizer.t)
            if WORLD.rank == 0:
                out[0] = np.nan  # in rank 0's share of the sum
        return loss

    monkeypatch.setattr(net, "grad_sum", nan_at_the_fourth_step)
    with pytest.raises(DivergenceError, match="step 4"):
        trainer.fit(X, y)
    assert all_ranks(trainer.stepper.sharded)
    assert all_ranks(np.array_equal(net.params, before["params"]) and trainer.optimizer.t == 3)
    assert all_ranks(same_everywhere(net.params, *trainer.optimizer.state.values()))


def test_a_trainer_stopped_without_checkpoints_fits_on_as_if_never_stopped():
    """The sharded optimizer state is whole again after an interrupted fit, checkpoint or not."""
    from distnn.trainer import Interrupted
    straight, _ = train(WORLD, "multinomial", "adam")
    stopped, _ = train(WORLD, "multinomial", "adam", epochs=0)
    stopped.epochs = 7
    X, y = problem("multinomial")
    grad_sum = stopped.net.grad_sum

    def stop_at_step_10(*args, **kwargs):
        if stopped.step == 10 and WORLD.rank == 0:
            stopped.request_stop()  # as the SIGTERM handler does, on one rank
        return grad_sum(*args, **kwargs)

    stopped.net.grad_sum = stop_at_step_10
    with pytest.raises(Interrupted):
        stopped.fit(X, y, X[:13], y[:13])
    stopped.net.grad_sum = grad_sum
    stopped.fit(X, y, X[:13], y[:13])
    assert all_ranks(stopped.net.params.tobytes() == straight.net.params.tobytes())


@pytest.mark.parametrize("family", ["gaussian", "bernoulli", "multinomial", "poisson"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_p_ranks_train_like_one_rank(family, opt):
    # 51 samples in global batches of 10: uneven shards, and a last batch of 1 (< P ranks)
    world, world_hist = train(WORLD, family, opt)
    single, single_hist = train(MPI.COMM_SELF, family, opt)
    assert world.step == single.step == 7 * 6  # 42 steps
    rel = np.abs(world.net.params - single.net.params).max() / np.abs(single.net.params).max()
    assert all_ranks(rel <= 1e-10), rel
    for a, b in zip(world_hist, single_hist):
        assert all_ranks(abs(a["loss"] - b["loss"]) <= 1e-10 * abs(b["loss"]))
        assert all_ranks(abs(a["val_loss"] - b["val_loss"]) <= 1e-10 * abs(b["val_loss"]))


def test_ranks_hold_bit_identical_parameters_after_every_epoch():
    digests = []

    def record(_):
        digests.append(hashlib.sha256(trainer.net.params.tobytes()).hexdigest())

    X, y = problem("multinomial", n=200)
    net = Network([5, 16, 3], family="multinomial", seed=3)
    trainer = Trainer(net, optim.Adam(lr=0.01), batch_size=32, epochs=5, comm=WORLD,
                      callback=record)
    history = trainer.fit(X, y)
    everyone = WORLD.allgather(digests)
    assert all_ranks(all(d == everyone[0] for d in everyone) and len(digests) == 5)
    assert all_ranks(history == WORLD.bcast(history))  # identical metrics on every rank


def test_training_learns_a_separable_problem():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 5))
    y = np.argmax(X[:, :3], axis=1)  # classes a linear model can tell apart
    net = Network([5, 16, 3], family="multinomial", seed=5)
    history = Trainer(net, optim.Adam(lr=0.02), batch_size=30, epochs=15, comm=WORLD).fit(X, y)
    assert all_ranks(history[-1]["loss"] < 0.3 * history[0]["loss"])
    assert all_ranks(history[-1]["accuracy"] > 0.95)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_resume_mid_epoch_continues_bit_identically(opt):
    directory = shared_dir()
    full, _ = train(WORLD, "multinomial", opt, checkpoint_dir=directory, checkpoint_every=9,
                    keep_checkpoints=100)
    step9 = [p for p in list_checkpoints(directory) if p.name == "ckpt-000000009.npz"][0]
    resumed = Trainer.resume(step9, comm=WORLD, checkpoint_dir=None)
    assert resumed.step == 9 and resumed.epoch == 1 and resumed.batch == 3  # mid-epoch
    X, y = problem("multinomial")
    history = resumed.fit(X, y, X[:13], y[:13])
    assert all_ranks(np.array_equal(resumed.net.params, full.net.params))
    assert all_ranks(without_time(history) == without_time(full.history))


def test_resume_with_another_rank_count_agrees_to_round_off():
    directory = shared_dir()
    full, _ = train(WORLD, "gaussian", "adam", checkpoint_dir=directory, checkpoint_every=20,
                    keep_checkpoints=100)
    path = [p for p in list_checkpoints(directory) if p.name == "ckpt-000000020.npz"][0]
    alone = Trainer.resume(path, comm=MPI.COMM_SELF, checkpoint_dir=None)  # P ranks -> 1 rank
    X, y = problem("gaussian")
    alone.fit(X, y, X[:13], y[:13])
    rel = np.abs(alone.net.params - full.net.params).max() / np.abs(full.net.params).max()
    assert all_ranks(rel <= 1e-10)


def test_truncated_checkpoint_is_refused_and_the_previous_one_is_kept():
    directory = shared_dir()
    train(WORLD, "multinomial", "momentum", epochs=2, checkpoint_dir=directory)
    good, newest = list_checkpoints(directory)[-2:]
    if WORLD.rank == 0:
        data = newest.read_bytes()
        newest.write_bytes(data[: len(data) // 2])  # an interrupted write
    WORLD.Barrier()
    with pytest.raises(CheckpointError, match=newest.name):
        Trainer.resume(newest, comm=WORLD)  # every rank raises, none hangs
    assert all_ranks(Trainer.resume(good, comm=WORLD).step == 6)


def test_deterministic_mode_agrees_with_the_default_mode_to_round_off():
    exact, _ = train(WORLD, "multinomial", "adam", epochs=6, deterministic=True, chunk_size=4)
    plain, _ = train(MPI.COMM_SELF, "multinomial", "adam", epochs=6)
    assert exact.step == 36
    rel = np.abs(exact.net.params - plain.net.params).max() / np.abs(plain.net.params).max()
    assert all_ranks(rel <= 1e-10), rel


def test_ranks_sharing_a_node_split_its_cores_between_their_blas_threads():
    from threadpoolctl import threadpool_info

    from distnn.threads import usable_cpus

    seen = []
    X, y = problem("multinomial")
    trainer = Trainer(Network([5, 8, 3], seed=1), optim.SGD(lr=0.1), batch_size=10, epochs=1,
                      comm=WORLD, callback=lambda _: seen.extend(
                          p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"))
    trainer.fit(X, y)
    share = max(1, usable_cpus() // WORLD.Get_size())  # every rank of the test runs on one node
    assert all_ranks(seen and all(n == share for n in seen)), seen


def test_a_callback_failing_on_one_rank_fails_every_rank_instead_of_hanging():
    def rank0_breaks(record):
        if WORLD.rank == 0:
            raise KeyError("metrics sink gone")

    X, y = problem("multinomial")
    trainer = Trainer(Network([5, 8, 3], seed=1), optim.SGD(lr=0.1), batch_size=10, epochs=2,
                      comm=WORLD, callback=rank0_breaks)
    with pytest.raises(Exception, match="metrics sink gone"):
        trainer.fit(X, y)
    assert trainer.epoch == 1  # all stopped after the first epoch's callback
