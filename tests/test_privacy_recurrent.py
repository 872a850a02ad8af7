"""DP-SGD for a `Recurrent`: a sample is a sequence, clipped whole (the sum of its targets'
gradients) in one BPTT. The clipped sum and the norms against each sequence's gradient formed by
`Recurrent.gradient` on that sequence alone; the trainer's private step and epoch by hand; resume.
P ranks: tests/test_privacy_mpi.py."""
from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

import distnn.recurrent as recurrent
from distnn import kernels, optim, privacy
from distnn.privacy import DP
from distnn.recurrent import Recurrent
from distnn.trainer import Trainer

import problems

FAMILIES = {"gaussian": 2, "multinomial": 3, "bernoulli": 2, "poisson": 2}
SELF = MPI.COMM_SELF


def sequences(family, targets, n, t, d, k, seed):
    """X (n, t, d), targets, lengths 1..t (one of each extreme), NaN/1e300 beyond the lengths."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, t, d))
    lengths = rng.integers(1, t + 1, size=n)
    lengths[0], lengths[1] = t, 1
    y = problems.random_targets(family, n if targets == "last" else n * t, k, rng)
    if targets == "every":
        y = np.array(y.reshape(n, t, *y.shape[1:]), dtype=float)
    dead = np.arange(t)[None, :] >= lengths[:, None]
    X[dead] = np.nan
    X[dead & (np.arange(t) % 2 == 0)] = 1e300
    if targets == "every":
        y[dead] = np.nan
    return X, y, lengths


def per_sequence_gradients(rnn, X, y, lengths):
    """Each sequence's data-loss gradient, formed whole: Recurrent.gradient on that sequence alone
    (a mean over its targets, penalty included), less the penalty, times its target count."""
    penalty = rnn.add_penalty_grad(rnn.grad_buffer())
    every = rnn.targets == "every"
    return [(rnn.gradient(X[n:n + 1], y[n:n + 1], lengths[n:n + 1]) - penalty)
            * (lengths[n] if every else 1) for n in range(len(X))]


def forced(path):
    """_layer_sq_norms taking one way whatever the cost: the Gram kernel, or each g_n formed."""
    def norms(p, inp, lengths, sq, buf):
        if path == "gram":
            t, n, o = p.shape
            scratch = kernels.sequence_scratch(n, t, o, inp.shape[2])
            kernels.add_sequence_sq_norms(p, inp, lengths, sq, scratch)
        else:
            recurrent._formed_sq_norms(p, inp, lengths, sq)
    return norms


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("state_activation", ["tanh", "relu"])
@pytest.mark.parametrize("hidden", [[], [5]])
@pytest.mark.parametrize("targets", ["last", "every"])
@pytest.mark.parametrize("bptt", [0, 2])
@pytest.mark.parametrize("path", ["gram", "formed"])
def test_clipped_sum_equals_each_sequence_clipped_by_brute_force(
        monkeypatch, family, state_activation, hidden, targets, bptt, path):
    """One BPTT with each sequence's rows scaled by c_n is each sequence's own gradient clipped
    to C and summed, for every family, with and without a hidden layer, targets at the last step
    or every step, lengths 1..T with garbage beyond them, full and truncated BPTT, L1/L2 set
    (they stay out of the clip), the norms by Gram products or by each gradient formed."""
    monkeypatch.setattr(recurrent, "_layer_sq_norms", forced(path))
    k = FAMILIES[family]
    X, y, lengths = sequences(family, targets, 7, 5, 3, k, seed=len(hidden) + bptt)
    rnn = Recurrent([3, *hidden, k], 4, activation="tanh", state_activation=state_activation,
                    family=family, targets=targets, l1=0.01, l2=0.02, seed=3)
    rnn.bptt = bptt
    grads = per_sequence_gradients(rnn, X, y, lengths)
    norms = np.array([np.linalg.norm(g) for g in grads])
    clip = float(np.median(norms))  # about half the sequences clipped, half not
    expected = sum(g * min(1.0, clip / nrm) for g, nrm in zip(grads, norms)) / 7.5
    Xc, Y = rnn._checked(X, y, lengths)
    out = rnn.grad_buffer()
    loss = rnn.clipped_grad_sum(Xc, Y, out, clip, 7.5)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    assert loss == pytest.approx(rnn.loss_sum(Xc, Y), rel=1e-12)  # the loss is not clipped
    np.testing.assert_allclose(rnn.sample_grad_norms(X, y, lengths), norms, rtol=1e-12)
    again = rnn.grad_buffer()
    rnn.grad_sum(Xc, Y, again, divisor=7.5, clip=clip)  # Network's spelling of the same
    np.testing.assert_array_equal(again, out)


def test_a_large_clip_changes_nothing_and_an_empty_batch_sums_zero():
    X, y, lengths = sequences("multinomial", "every", 8, 5, 3, 3, seed=2)
    rnn = Recurrent([3, 5, 3], 4, targets="every", seed=0)
    Xc, Y = rnn._checked(X, y, lengths)
    plain, clipped = rnn.grad_buffer(), rnn.grad_buffer()
    rnn.grad_sum(Xc, Y, plain, divisor=4.0)
    rnn.clipped_grad_sum(Xc, Y, clipped, 1e9, 4.0)
    np.testing.assert_allclose(clipped, plain, rtol=1e-13, atol=1e-16)
    out = rnn.grad_buffer() + 1
    assert rnn.clipped_grad_sum(Xc[:0], Y[:0], out, 1.0, 4.0) == 0.0
    assert not out.any()


@pytest.mark.parametrize("targets", ["last", "every"])
def test_sample_grad_norms_are_the_norms_of_each_sequences_gradient(targets):
    """Two hidden layers, the norms only (no clip), by whichever way the cost picks."""
    X, y, lengths = sequences("multinomial", targets, 9, 6, 2, 3, seed=5)
    rnn = Recurrent([2, 6, 4, 3], 3, activation="relu", targets=targets, l2=0.1, seed=2)
    grads = per_sequence_gradients(rnn, X, y, lengths)
    np.testing.assert_allclose(rnn.sample_grad_norms(X, y, lengths),
                               [np.linalg.norm(g) for g in grads], rtol=1e-12)
    assert rnn.sample_grad_norms(X[:0], y[:0], lengths[:0]).shape == (0,)


def test_the_gram_products_and_the_formed_gradients_agree_and_the_cost_picks_between_them(
        monkeypatch):
    """The two ways to ‖Σ_t P_t ⊗ I_t‖² + ‖Σ_t P_t‖², on random signals with zero padding; short
    sequences take the Gram products (T² work), long ones the formed gradients (T o i, BLAS)."""
    rng = np.random.default_rng(0)
    t, n, o, i = 9, 5, 4, 6
    p, inp = rng.normal(size=(t, n, o)), rng.normal(size=(t, n, i))
    lengths = np.array([9, 1, 4, 7, 2], np.intp)
    gram, formed = np.zeros(n), np.zeros(n)
    kernels.add_sequence_sq_norms(p, inp, lengths, gram,
                                  kernels.sequence_scratch(n, t, o, i))
    recurrent._formed_sq_norms(p, inp, lengths, formed)
    direct = [np.sum((p[:m, j].T @ inp[:m, j]) ** 2) + np.sum(p[:m, j].sum(0) ** 2)
              for j, m in enumerate(lengths)]
    np.testing.assert_allclose(gram, direct, rtol=1e-13)
    np.testing.assert_allclose(formed, direct, rtol=1e-13)
    calls = []
    monkeypatch.setattr(kernels, "add_sequence_sq_norms", lambda *a: calls.append("gram"))
    monkeypatch.setattr(recurrent, "_formed_sq_norms", lambda *a: calls.append("formed"))
    p, inp = np.zeros((128, 3, 16)), np.zeros((128, 3, 16))
    buf = SimpleNamespace(gram={})  # the buffers' scratch
    recurrent._layer_sq_norms(p, inp, np.full(3, 8, np.intp), np.zeros(3), buf)
    recurrent._layer_sq_norms(p, inp, np.full(3, 128, np.intp), np.zeros(3), buf)
    assert calls == ["gram", "formed"]


def test_clipped_sum_in_float32_is_the_float64_one_to_float32_precision():
    X, y, lengths = sequences("multinomial", "every", 12, 6, 3, 3, seed=1)
    outs = []
    for dtype in ("float64", "float32"):
        rnn = Recurrent([3, 7, 3], 4, targets="every", dtype=dtype, seed=0)
        with np.errstate(over="ignore"):  # the garbage 1e300 beyond the lengths: inf in float32
            Xc, Y = rnn._checked(X, y, lengths)
        out = rnn.grad_buffer()
        rnn.clipped_grad_sum(Xc, Y, out, 0.3, 10.0)
        outs.append(out)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- the trainer

def data(targets="every"):
    return sequences("multinomial", targets, 60, 6, 3, 3, seed=0)


def private_rnn(targets="every"):
    return Recurrent([3, 6, 3], 4, activation="tanh", targets=targets, l2=1e-3, seed=1)


def fit(epochs=3, targets="every", lr=0.2, **kw):
    X, y, lengths = data(targets)
    kw.setdefault("privacy", DP(noise_multiplier=1.0, max_grad_norm=0.5, noise_seed=4))
    trainer = Trainer(private_rnn(targets), optim.SGD(lr=lr, momentum=0.5), batch_size=10,
                      epochs=epochs, seed=4, comm=SELF, **kw)
    trainer.fit(X, y, lengths=lengths)
    return trainer


@pytest.mark.parametrize("targets", ["last", "every"])
def test_one_private_step_is_the_clipped_sequence_sum_over_b_plus_noise_then_penalty_then_sgd(
        targets):
    """By hand: Σ_n clip(g_n) / B over the Poisson-sampled sequences (B = qN, in sequences,
    whatever their lengths), + σC/B z_t, + the L2 penalty's gradient, then SGD."""
    X, y, lengths = data(targets)
    rnn, ref = private_rnn(targets), private_rnn(targets)
    trainer = Trainer(rnn, optim.SGD(lr=0.2), batch_size=10, epochs=1, seed=4, comm=SELF,
                      privacy=DP(noise_multiplier=1.3, max_grad_norm=0.5, noise_seed=4))
    trainer._plan = trainer._private_plan(60, None)
    rows = trainer._plan.rows(0)
    Xc, Y = rnn._checked(X, y, lengths)
    trainer.train_batch(Xc, Y, rows)
    grads = per_sequence_gradients(ref, X[rows], y[rows], lengths[rows])
    g = sum(x * min(1.0, 0.5 / np.linalg.norm(x)) for x in grads) / 10.0
    g += 1.3 * 0.5 / 10 * privacy.add_noise(np.zeros(ref.n_params), 1.0, 4, 0)
    ref.add_penalty_grad(g)
    np.testing.assert_allclose(rnn.params, ref.params - 0.2 * g, rtol=1e-12, atol=1e-15)


def test_a_private_epochs_loss_and_accuracy_are_per_target_not_per_sequence():
    """With lr = 1e-300 nothing moves (to 1e-300): the epoch's loss is Σ_t loss of its Poisson batches over the
    epoch's expected targets (steps · q · Σ lengths), and its accuracy a fraction."""
    X, y, lengths = data("every")
    trainer = fit(epochs=1, lr=1e-300)
    rnn, plan = trainer.net, trainer._plan
    Xc, Y = rnn._checked(X, y, lengths)
    total = sum(rnn.loss_sum(Xc[plan.rows(s)], Y[plan.rows(s)]) for s in range(plan.steps_per_epoch))
    record = trainer.history[0]
    assert record["loss"] == pytest.approx(
        total / (plan.steps_per_epoch * plan.q * lengths.sum()) + rnn.penalty(), rel=1e-12)
    assert 0 <= record["accuracy"] <= 1
    assert record["loss"] == pytest.approx(rnn.loss(X, y, lengths), rel=0.5)  # the same scale


def test_deterministic_private_recurrent_training_equals_the_default_mode_to_round_off():
    a = fit(epochs=2)
    b = fit(epochs=2, deterministic=True, chunk_size=3)
    np.testing.assert_allclose(b.net.params, a.net.params, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("noise_seed", [4, None])
def test_resume_continues_parameters_and_accounting_bit_identically(tmp_path, noise_seed):
    """A private Recurrent (truncated BPTT) resumed after epoch 1 or 2, to epoch 3: the bits and
    the accounting of one run (the secret key, if drawn, from the checkpoint)."""
    dp = DP(noise_multiplier=1.0, max_grad_norm=0.5, noise_seed=noise_seed)
    part = fit(epochs=2, checkpoint_dir=tmp_path, privacy=dp, bptt=2)
    X, y, lengths = data()
    whole = Trainer.resume(sorted(tmp_path.iterdir())[0], comm=SELF, epochs=3, checkpoint_dir=None)
    assert whole.bptt == 2
    whole.fit(X, y, lengths=lengths)
    resumed = Trainer.resume(sorted(tmp_path.iterdir())[-1], comm=SELF, epochs=3)
    assert resumed.privacy_spent == part.privacy_spent
    resumed.fit(X, y, lengths=lengths)
    np.testing.assert_array_equal(resumed.net.params, whole.net.params)
    assert resumed.privacy_spent == whole.privacy_spent
    assert resumed.history[-1]["epsilon"] == whole.history[-1]["epsilon"]
    if noise_seed is not None:  # and as a run never interrupted
        np.testing.assert_array_equal(fit(epochs=3, bptt=2).net.params, whole.net.params)
