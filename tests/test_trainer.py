"""The trainer in one process: signals, divergence, early stopping, input checks, checkpoints."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from distnn import Network, optim
from distnn.checkpoint import latest_checkpoint, list_checkpoints
from distnn.trainer import DivergenceError, Interrupted, Trainer


def blobs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    return X, np.argmax(X[:, :3] + 0.5 * rng.normal(size=(n, 3)), axis=1)


def make(directory=None, **kw):
    net = Network([4, 12, 3], family="multinomial", seed=1)
    settings = dict(batch_size=16, epochs=6, seed=2, comm=MPI.COMM_SELF, checkpoint_dir=directory)
    return Trainer(net, optim.Adam(lr=0.01), **(settings | kw))


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resume_is_bit_identical(tmp_path):
    X, y = blobs()
    straight = make()
    straight.fit(X, y)

    def kill_in_epoch_3(record):
        if record["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = make(tmp_path, callback=kill_in_epoch_3)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at epoch 3") as info:
        stopped.fit(X, y)
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = Trainer.resume(latest_checkpoint(tmp_path), comm=MPI.COMM_SELF)
    assert resumed.step == 8 * 2 + 1  # two epochs of 8 batches, then the step that saw the flag
    resumed.fit(X, y)
    np.testing.assert_array_equal(resumed.net.params, straight.net.params)
    stopped.callback = None
    stopped.fit(X, y)  # the same trainer goes on too: the spent signal does not stop it again
    np.testing.assert_array_equal(stopped.net.params, straight.net.params)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")  # the point of it
@pytest.mark.parametrize("deterministic", [False, True])
def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, deterministic):
    X, y = blobs()
    trainer = make(tmp_path, epochs=50, deterministic=deterministic, chunk_size=5)
    trainer.optimizer = optim.SGD(lr=1.0)
    trainer.optimizer.init(trainer.net.params)

    def blow_up(record):
        if record["epoch"] == 2:
            trainer.optimizer.lr = 1e300  # the next steps overflow to Inf, then NaN

    trainer.callback = blow_up
    with pytest.raises(DivergenceError, match=r"diverged at epoch 3, step \d+.*lower the learning rate"):
        trainer.fit(X, y)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000008.npz", "ckpt-000000016.npz"]
    assert Trainer.resume(latest_checkpoint(tmp_path), comm=MPI.COMM_SELF).step == 16


def overfitting(directory=None):
    """(trainer, train, validation): labels that are pure noise, so validation loss turns up."""
    X, _ = blobs(n=60, seed=3)
    y = np.random.default_rng(4).integers(0, 3, size=60)
    net = Network([4, 64, 3], family="multinomial", seed=1)
    trainer = Trainer(net, optim.Adam(lr=0.05), batch_size=10, epochs=300, patience=4,
                      comm=MPI.COMM_SELF, checkpoint_dir=directory, keep_checkpoints=1)
    return trainer, (X[:40], y[:40]), (X[40:], y[40:])


def test_early_stopping_keeps_the_best_model():
    trainer, train, val = overfitting()
    history = trainer.fit(*train, *val)
    losses = [r["val_loss"] for r in history]
    assert len(history) < 300
    assert np.argmin(losses) == len(history) - 1 - 4  # stopped after 4 epochs without a new best
    assert trainer.evaluate(*val)[0] == pytest.approx(min(losses), rel=1e-12)


def test_schedule_and_clipping_reach_the_update():
    X, y = blobs()
    trainer = make(schedule={"schedule": "step", "step_size": 8, "gamma": 0.5}, clip_norm=0.1)
    history = trainer.fit(X, y)
    assert [r["lr"] for r in history[:3]] == [0.01, 0.005, 0.0025]  # each epoch's last step's


@pytest.mark.parametrize("X,y,message", [
    (np.full((20, 4), np.nan), np.zeros(20, int), "training X row 0, column 0 is NaN"),
    (np.ones((20, 3)), np.zeros(20, int), r"training X has shape \(20, 3\); expected \(N, 4\)"),
    (np.ones((20, 4)), np.full(20, 3), "label 3 at row 0 is outside 0..2"),
    (np.ones((20, 4)), np.zeros(19, int), "X has 20 rows but y has 19"),
    (np.ones((0, 4)), np.zeros(0, int), "training data is empty"),  # a larger batch is clipped
])
def test_bad_training_data_is_a_clear_error(X, y, message):
    with pytest.raises(ValueError, match=message):
        make().fit(X, y)


@pytest.mark.parametrize("threads, pinned", [(None, 1), (2, 2)])
def test_deterministic_mode_pins_its_blas_threads_whatever_the_callers_limit(threads, pinned):
    from threadpoolctl import threadpool_info, threadpool_limits

    seen = []
    trainer = make(deterministic=True, chunk_size=5, threads=threads, callback=lambda _: seen.extend(
        p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"))
    with threadpool_limits(3 - pinned, user_api="blas"):
        trainer.fit(*blobs())
    assert seen and set(seen) == {pinned}


def test_deterministic_mode_keeps_its_threads_through_a_checkpoint_and_in_evaluate(tmp_path):
    from threadpoolctl import threadpool_info, threadpool_limits

    X, y = blobs()
    trainer = make(deterministic=True, chunk_size=5, threads=2, epochs=1)
    trainer.fit(X, y)
    trainer.save(tmp_path / "t.npz")
    resumed = Trainer.resume(tmp_path / "t.npz", comm=MPI.COMM_SELF)
    assert resumed.threads == 2  # the thread count is part of what makes the bits
    seen = []
    eval_sums = resumed.net.eval_sums
    resumed.net.eval_sums = lambda *a: (seen.extend(p["num_threads"] for p in threadpool_info()
                                                    if p["user_api"] == "blas"), eval_sums(*a))[1]
    with threadpool_limits(1, user_api="blas"):
        resumed.evaluate(X, y)
    assert seen and set(seen) == {2}


@pytest.mark.parametrize("deterministic", [False, True])
def test_close_gives_back_the_step_buffers_and_the_comm_it_made(tmp_path, deterministic):
    X, y = blobs()
    with make(epochs=1, deterministic=deterministic, chunk_size=5) as trainer:
        trainer.fit(X, y)
        comm, scores = trainer.comm, trainer.evaluate(X, y)
    assert trainer.closed and comm.watchdog is None and comm.shared_nbytes == 0
    assert trainer.history and trainer.net.predict(X[:3]).shape == (3, 3)  # results stay
    assert trainer.evaluate(X, y) == scores  # evaluating and saving need no step buffer
    trainer.save(tmp_path / "closed.npz")
    assert Trainer.resume(tmp_path / "closed.npz", comm=MPI.COMM_SELF).step == trainer.step
    with pytest.raises(RuntimeError, match="this Trainer was closed"):
        trainer.fit(X, y)


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tmp_path):
    trainer, train, val = overfitting(tmp_path)
    history = trainer.fit(*train, *val)
    resumed = Trainer.resume(latest_checkpoint(tmp_path), comm=MPI.COMM_SELF)
    assert resumed.fit(*train, *val) == history
    np.testing.assert_array_equal(resumed.net.params, trainer.net.params)  # the best, as saved


def test_an_early_stopped_run_resumed_without_early_stopping_trains_on(tmp_path):
    stopped, train, val = overfitting(tmp_path)
    epochs = len(stopped.fit(*train, *val))
    more = Trainer.resume(latest_checkpoint(tmp_path), comm=MPI.COMM_SELF, patience=0,
                          epochs=epochs + 3, checkpoint_dir=None)
    assert len(more.fit(*train, *val)) == epochs + 3
    assert not np.array_equal(more.net.params, stopped.net.params)  # the new epochs are kept


@pytest.mark.parametrize("threads", [-1, 2.5, "2"])
def test_bad_thread_counts_are_refused_at_construction(threads):
    with pytest.raises(ValueError, match="threads must be an integer >= 0"):
        make(threads=threads)


def test_a_resumed_run_given_more_epochs_stretches_its_schedule(tmp_path):
    X, y = blobs()
    cosine = {"schedule": "cosine"}
    make(tmp_path, epochs=2, schedule=cosine).fit(X, y)
    longer = Trainer.resume(latest_checkpoint(tmp_path), comm=MPI.COMM_SELF, epochs=4)
    straight = make(epochs=4, schedule=cosine)
    assert [r["lr"] for r in longer.fit(X, y)][2:] == [r["lr"] for r in straight.fit(X, y)][2:]


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match="file"):
        make(tmp_path / "file" / "checkpoints").fit(*blobs())


def test_deterministic_steps_reduce_bounds_then_the_gradient_on_their_grid(monkeypatch):
    from distnn.comm import Comm

    calls, sizes = [], []
    for name in ("allreduce", "allreduce_max", "grid_sum", "any", "bcast", "barrier"):
        original = getattr(Comm, name)
        monkeypatch.setattr(Comm, name, lambda self, *a, _f=original, _n=name, **k:
                            (calls.append(_n), sizes.append((_n, np.size(a[0]) if a else 0)),
                             _f(self, *a, **k))[2])
    trainer = make(deterministic=True, chunk_size=5, epochs=1, check_every=0)
    X, y = blobs()
    calls.clear()
    sizes.clear()
    trainer.fit(X, y)
    # one MAX of the layers' signal bounds (one number per unit and input, not per parameter),
    # then the chunks summed on their grid where they are (one rank here; node shared memory) and
    # a SUM of the three statistics, the stop flag among them; no separate flag collective
    net = trainer.net
    assert calls.count("allreduce_max") == trainer.step and calls.count("any") == 0
    bounds = sum(net.sizes[1:]) + sum(net.sizes[:-1]) + 2  # + the two statistics
    assert sizes.count(("allreduce_max", bounds)) == trainer.step and bounds < net.n_params
    assert all(s < bounds for n, s in sizes if n == "allreduce_max" and s != bounds)
    assert calls.count("grid_sum") == trainer.step
    assert sizes.count(("allreduce", 3)) == trainer.step
    assert not any(s >= net.n_params for n, s in sizes if n == "allreduce")


def test_importing_the_trainer_and_the_run_does_not_start_mpi():
    """MPI starts when a Comm is made, not at import: `from distnn import Network` and the tools
    that never train work where MPI cannot start (a login node)."""
    code = ("import sys, distnn.trainer, distnn.step, distnn.run, distnn.cli, distnn.comm; "
            "print('mpi4py.MPI' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
