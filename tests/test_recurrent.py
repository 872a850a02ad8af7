"""Recurrent networks: BPTT against central differences and against the forward Jacobian recursion,
T = 1 against the feed-forward net, padding, truncation, shapes, input checks, rebuilding."""

import itertools

import numpy as np
import pytest

import distnn
from distnn import activations, families
from distnn.model import build, load_model, save_model, spec_n_params
from distnn.network import Network
from distnn.recurrent import Recurrent
from problems import random_targets

FAMILIES = families.NAMES


def numeric_grad(f, x, h=1e-6):
    """Central differences of f (a scalar or an array) with respect to the vector x, restored."""
    out = None
    for i in range(x.size):
        keep = x[i]
        x[i] = keep + h
        up = np.asarray(f())
        x[i] = keep - h
        down = np.asarray(f())
        x[i] = keep
        if out is None:
            out = np.zeros(up.shape + (x.size,))
        out[..., i] = (up - down) / (2 * h)
    return out


def rel_err(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)


def k_of(family):
    return 3 if family == "multinomial" else 2


def targets(family, targets_, n, t, k, rng):
    if targets_ == "last":
        return random_targets(family, n, k, rng)
    y = random_targets(family, n * t, k, rng)
    return y.reshape(n, t, *y.shape[1:])


def sequences(rng, n=5, t=4, d=3, varied=True):
    X = rng.normal(size=(n, t, d))
    lengths = rng.integers(1, t + 1, size=n) if varied else None
    if varied:
        lengths[0] = t  # one full sequence: the last step is used
    return X, lengths


def garbage(X, y, lengths, targets_):
    """X and y with NaN/huge values at every step that does not exist."""
    X, y = X.copy(), np.array(y, dtype=float)
    dead = np.arange(X.shape[1])[None, :] >= lengths[:, None]
    X[dead] = np.nan
    X[dead & (np.arange(X.shape[1]) % 2 == 0)] = 1e300
    if targets_ == "every":
        y[dead] = np.nan
    return X, y


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("state_activation", activations.NAMES)
def test_bptt_equals_central_differences(family, state_activation):
    """Every family x state activation; without and with hidden layers, targets last and every,
    variable lengths with garbage beyond them, penalties on."""
    rng = np.random.default_rng(len(family) * 11 + len(state_activation))
    k = k_of(family)
    for hidden, targets_ in itertools.product([[], [5]], ["last", "every"]):
        rnn = Recurrent([3, *hidden, k], 4, activation="tanh", state_activation=state_activation,
                        family=family, targets=targets_, l1=0.01, l2=0.02, seed=1)
        rnn.params[...] += rng.normal(scale=0.2, size=rnn.n_params)  # biases off 0 too
        X, lengths = sequences(rng)
        y = targets(family, targets_, 5, 4, k, rng)
        X, y = garbage(X, y, lengths, targets_)
        grad = rnn.gradient(X, y, lengths)
        numeric = numeric_grad(lambda: rnn.loss(X, y, lengths), rnn.params)
        assert rel_err(grad, numeric) <= 1e-6, (hidden, targets_)


@pytest.mark.parametrize("targets_", ["last", "every"])
def test_bptt_equals_the_forward_jacobian_recursion(targets_):
    """Gaussian: the data loss's gradient is Σ Jᵀ (mean − y) / M over the targets that exist, J
    from the forward recursion dz(t)/dw = ∂f/∂w + ∂f/∂r · dr(t)/dw."""
    rng = np.random.default_rng(2)
    rnn = Recurrent([3, 6, 2], 4, activation="tanh", family="gaussian", targets=targets_, seed=3)
    X, lengths = sequences(rng, n=6, t=5)
    y = targets("gaussian", targets_, 6, 5, 2, rng)
    J = rnn.param_jacobian(X, lengths)  # (N, [T,] n_out, n_params)
    residual = rnn.predict(X, lengths) - (y if targets_ == "last" else
                                          y * (np.arange(5)[None, :, None] < lengths[:, None, None]))
    m = 6 if targets_ == "last" else lengths.sum()
    expected = np.einsum("ik,ikp->p", residual.reshape(-1, 2), J.reshape(-1, 2, rnn.n_params)) / m
    np.testing.assert_allclose(rnn.gradient(X, y, lengths), expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_jacobian_equals_central_differences_of_predict(family):
    rng = np.random.default_rng(4)
    for targets_ in ("last", "every"):
        rnn = Recurrent([3, 5, k_of(family)], 2, activation="tanh", state_activation="sigmoid",
                        family=family, targets=targets_, seed=1)
        X, lengths = sequences(rng)
        J = rnn.param_jacobian(X, lengths)
        numeric = numeric_grad(lambda: rnn.predict(X, lengths), rnn.params)
        assert J.shape == numeric.shape
        np.testing.assert_allclose(J, numeric, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_is_the_feed_forward_network_on_x_and_zero_state(family):
    """T = 1: r(0) = 0 and r(1) feeds nothing, so the prediction, loss and gradient are those of
    the Network [n_in, *hidden, n_out] made of f's weights without the state's columns and rows
    (f's own Network applies the link to the state outputs too: it equals on the logits only);
    the state's weights get no gradient."""
    rng = np.random.default_rng(5)
    k, s = k_of(family), 3
    rnn = Recurrent([4, 6, k], s, activation="relu", family=family, seed=2)
    ff = Network([4, 6, k], activation="relu", family=family)
    ff.weights[0][...] = rnn.weights[0][:, :4]
    ff.biases[0][...] = rnn.biases[0]
    ff.weights[1][...] = rnn.weights[1][:k]
    ff.biases[1][...] = rnn.biases[1][:k]
    X = rng.normal(size=(7, 4))
    y = random_targets(family, 7, k, rng)
    seq = X[:, None, :]
    np.testing.assert_allclose(rnn.predict(seq), ff.predict(X), rtol=1e-14)
    np.testing.assert_allclose(rnn.logits(seq), rnn.net.logits(np.hstack([X, np.zeros((7, s))]))[:, :k],
                               rtol=1e-14)
    assert rnn.loss(seq, y) == pytest.approx(ff.loss(X, y), rel=1e-14)
    g, g_ff = rnn.gradient(seq, y), ff.gradient(X, y)
    gw, gb = rnn.net._grad_views(g)
    fw, fb = ff._grad_views(g_ff)
    np.testing.assert_allclose(gw[0][:, :4], fw[0], rtol=1e-13)
    np.testing.assert_allclose(gb[0], fb[0], rtol=1e-13)
    np.testing.assert_allclose(gw[1][:k], fw[1], rtol=1e-13)
    np.testing.assert_allclose(gb[1][:k], fb[1], rtol=1e-13)
    assert not gw[0][:, 4:].any() and not gw[1][k:].any() and not gb[1][k:].any()


@pytest.mark.parametrize("targets_", ["last", "every"])
def test_padded_steps_change_nothing(targets_):
    """Each sequence alone, cut to its length, gives the same predictions, loss and gradient as
    the padded batch with garbage (NaN, 1e300) in X and y beyond the lengths."""
    rng = np.random.default_rng(6)
    rnn = Recurrent([3, 5, 3], 4, activation="tanh", family="multinomial", targets=targets_, seed=4)
    X, lengths = sequences(rng, n=6, t=5)
    y = targets("multinomial", targets_, 6, 5, 3, rng)
    Xg, yg = garbage(X, y, lengths, targets_)
    pred = rnn.predict(Xg, lengths)
    total_loss, total_grad = 0.0, np.zeros(rnn.n_params)
    for i, n in enumerate(lengths):
        yi = y[i:i + 1] if targets_ == "last" else y[i:i + 1, :n]
        own = rnn.predict(X[i:i + 1, :n])
        np.testing.assert_allclose(pred[i:i + 1] if targets_ == "last" else pred[i:i + 1, :n], own,
                                   rtol=1e-13)
        count = 1 if targets_ == "last" else n
        total_loss += rnn.loss(X[i:i + 1, :n], yi) * count
        total_grad += rnn.gradient(X[i:i + 1, :n], yi) * count
    if targets_ == "every":
        assert not pred[np.arange(5)[None, :] >= lengths[:, None]].any()  # 0 where no step is
    m = 6 if targets_ == "last" else lengths.sum()
    assert rnn.loss(Xg, yg, lengths) == pytest.approx(total_loss / m, rel=1e-12)
    np.testing.assert_allclose(rnn.gradient(Xg, yg, lengths), total_grad / m, rtol=1e-10,
                               atol=1e-14)


def test_truncated_bptt_from_the_window_length_of_the_sequence_on_is_full_bptt():
    rng = np.random.default_rng(7)
    rnn = Recurrent([3, 5, 2], 4, activation="tanh", family="gaussian", targets="every", seed=1)
    X, lengths = sequences(rng, n=5, t=6)
    y = targets("gaussian", "every", 5, 6, 2, rng)
    full = rnn.gradient(X, y, lengths)
    for k in (6, 7, 100):
        rnn.bptt = k
        np.testing.assert_array_equal(rnn.gradient(X, y, lengths), full)
    rnn.bptt = 3
    assert rel_err(rnn.gradient(X, y, lengths), full) > 1e-3  # a cut changes it


def test_truncated_bptt_windows_treat_the_carried_state_as_a_constant():
    """With windows of one step, each target's gradient is that of f at [x(t), r(t)] with r(t)
    held fixed: Σ_t J_f(t)ᵀ (mean − y)(t) / M for gaussian, J_f the Network's Jacobian at step t."""
    rng = np.random.default_rng(8)
    rnn = Recurrent([3, 5, 2], 4, activation="tanh", family="gaussian", targets="every", seed=1)
    X, lengths = sequences(rng, n=4, t=5)
    y = targets("gaussian", "every", 4, 5, 2, rng)
    rnn.bptt = 1
    twin = Network(rnn.net.sizes, "tanh", "gaussian")
    twin.params[...] = rnn.params
    rnn.predict(X, lengths)
    inputs = rnn._buffers[(4, 5)].inp.copy()  # [x(t), r(t)] of every step
    residual = rnn.predict(X, lengths) - y
    expected = np.zeros(rnn.n_params)
    for t in range(5):
        J = twin.param_jacobian(inputs[t])[:, :2]  # (N, n_out, n_params)
        alive = (t < lengths)[:, None]
        expected += np.einsum("nk,nkp->p", residual[:, t] * alive, J)
    np.testing.assert_allclose(rnn.gradient(X, y, lengths), expected / lengths.sum(), rtol=1e-11,
                               atol=1e-14)


def test_shapes_with_one_output_and_the_target_forms_accepted():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(4, 3, 2))
    last = Recurrent([2, 1], 2, family="bernoulli", targets="last")
    every = Recurrent([2, 1], 2, family="gaussian", targets="every")
    assert last.predict(X).shape == (4, 1) and every.predict(X).shape == (4, 3, 1)
    assert last.param_jacobian(X).shape == (4, 1, last.n_params)
    assert every.param_jacobian(X).shape == (4, 3, 1, every.n_params)
    yl, ye = rng.integers(0, 2, 4).astype(float), rng.normal(size=(4, 3))
    assert last.loss(X, yl) == last.loss(X, yl[:, None])
    assert every.loss(X, ye) == every.loss(X, ye[:, :, None])
    labels = Recurrent([2, 3], 2, family="multinomial", targets="every")
    yc = rng.integers(0, 3, (4, 3))
    assert labels.predict(X).shape == (4, 3, 3)
    assert labels.loss(X, yc) == labels.loss(X, yc[:, :, None])


def test_float32_follows_float64():
    rng = np.random.default_rng(10)
    X, lengths = sequences(rng, n=8, t=5)
    y = targets("multinomial", "every", 8, 5, 3, rng)
    r64 = Recurrent([3, 6, 3], 4, family="multinomial", targets="every", seed=2)
    r32 = Recurrent([3, 6, 3], 4, family="multinomial", targets="every", dtype="float32", seed=2)
    g32 = r32.gradient(X, y, lengths)
    assert g32.dtype == np.float32 and r32.predict(X, lengths).dtype == np.float32
    assert rel_err(g32.astype(np.float64), r64.gradient(X, y, lengths)) < 1e-5


def test_the_feed_forward_net_inside_shares_the_parameters():
    rnn = Recurrent([4, 7, 3], 5, activation="tanh", family="multinomial")
    assert isinstance(rnn.net, Network) and rnn.net.sizes == [9, 7, 8]
    assert rnn.params is rnn.net.params and rnn.n_params == rnn.net.n_params
    assert rnn.sizes == [4, 7, 3] and rnn.decisions == 1 and rnn.is_classifier


def test_spec_rebuilds_the_model_and_a_model_file_keeps_it(tmp_path):
    rnn = Recurrent([3, 4, 2], 3, activation="tanh", state_activation="relu", family="poisson",
                    targets="every", l2=0.1, dtype="float32", seed=5)
    spec = rnn.spec()
    assert spec["kind"] == "recurrent" and spec_n_params(spec) == rnn.n_params
    again = build(spec)
    assert isinstance(again, Recurrent) and again.spec() == spec
    assert isinstance(build(Network([3, 2]).spec()), Network)  # a spec without a kind
    save_model(rnn, tmp_path / "m.npz")
    model = load_model(tmp_path / "m.npz")
    assert model.net.spec() == spec
    np.testing.assert_array_equal(model.net.params, rnn.params)
    assert distnn.Recurrent is Recurrent


BAD = [
    ("ragged X", lambda r: r.predict([[[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]]]), "ragged"),
    ("2-D X", lambda r: r.predict(np.zeros((3, 2))), "expected (N, T, 2)"),
    ("wrong width", lambda r: r.predict(np.zeros((3, 4, 5))), "expected (N, T, 2)"),
    ("NaN at a step that exists", lambda r: r.predict(np.full((2, 3, 2), np.nan), [1, 1]),
     "sequence 0, step 0"),
    ("length 0", lambda r: r.predict(np.zeros((2, 3, 2)), [0, 3]), "outside 1..3"),
    ("length beyond T", lambda r: r.predict(np.zeros((2, 3, 2)), [4, 3]), "outside 1..3"),
    ("fractional length", lambda r: r.predict(np.zeros((2, 3, 2)), [1.5, 3]), "integers"),
    ("lengths of another N", lambda r: r.predict(np.zeros((2, 3, 2)), [1, 2, 3]), "one per sequence"),
    ("text lengths", lambda r: r.predict(np.zeros((2, 3, 2)), ["a", "b"]), "integers"),
    ("targets of another N", lambda r: r.loss(np.zeros((2, 3, 2)), [0, 1, 2]), "2 sequences"),
    ("label out of range", lambda r: r.loss(np.zeros((2, 3, 2)), [0, 5]), "outside 0..2"),
]
BAD_EVERY = [
    ("one target per sequence", lambda r: r.loss(np.zeros((2, 3, 2)), [0, 1]), "one target per step"),
    ("targets of another T", lambda r: r.loss(np.zeros((2, 3, 2)), np.zeros((2, 4))), "expected (N, 3)"),
    ("bad label at a step that exists", lambda r: r.loss(np.zeros((2, 3, 2)), [[0, 1, 7], [0, 0, 0]]),
     "sequence 0, step 2"),
]


@pytest.mark.parametrize("what, call, said", BAD + BAD_EVERY, ids=[b[0] for b in BAD + BAD_EVERY])
def test_bad_inputs_are_refused_in_one_line(what, call, said):
    rnn = Recurrent([2, 3], 2, family="multinomial",
                    targets="every" if (what, call, said) in BAD_EVERY else "last")
    with pytest.raises(ValueError) as e:
        call(rnn)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_a_bad_label_beyond_a_sequence_end_is_not_looked_at():
    rnn = Recurrent([2, 3], 2, family="multinomial", targets="every")
    assert np.isfinite(rnn.loss(np.zeros((2, 3, 2)), [[0, 1, -7], [0, 0, 0]], lengths=[2, 3]))


@pytest.mark.parametrize("kwargs, said", [
    ({"state": 0}, "state"), ({"state_activation": "cube"}, "state_activation"),
    ({"targets": "first"}, "targets"), ({"sizes": [3, 1]}, "at least 2 outputs"),
    ({"sizes": [3]}, "at least an input"), ({"family": "cauchy"}, "family")])
def test_bad_settings_are_refused_in_one_line(kwargs, said):
    args = {"sizes": [3, 2], "state": 2} | kwargs
    with pytest.raises(ValueError) as e:
        Recurrent(**args)
    assert said in str(e.value) and "\n" not in str(e.value)


# ---- training it with Trainer (one process; tests/test_recurrent_mpi.py for P ranks) ----------

def trainer_for(rnn, **kw):
    from mpi4py import MPI

    from distnn import optim
    from distnn.trainer import Trainer

    kw.setdefault("optimizer", optim.SGD(lr=0.1))
    return Trainer(rnn, comm=MPI.COMM_SELF, seed=3, **kw)


@pytest.mark.parametrize("targets_", ["last", "every"])
def test_a_full_batch_step_is_one_gradient_step_over_the_targets(targets_):
    """The step's divisor is the batch's count of targets (Σ lengths for "every"): one SGD step
    on the whole batch moves params by −lr · gradient(X, y, lengths), penalty included; integer
    sample weights count like repeated sequences."""
    rng = np.random.default_rng(11)
    X, lengths = sequences(rng, n=6, t=4)
    y = targets("bernoulli", targets_, 6, 4, 2, rng)
    rnn = Recurrent([3, 5, 2], 3, family="bernoulli", targets=targets_, l2=0.01, seed=1)
    expected = rnn.params - 0.1 * rnn.gradient(X, y, lengths)
    trainer = trainer_for(rnn, batch_size=6, epochs=1)
    history = trainer.fit(*garbage(X, y, lengths, targets_), lengths=lengths)
    np.testing.assert_allclose(rnn.params, expected, rtol=1e-12, atol=1e-15)

    w = np.array([1, 2, 0, 1, 3, 1])
    rep = np.repeat(np.arange(6), w)
    twin = Recurrent([3, 5, 2], 3, family="bernoulli", targets=targets_, l2=0.01, seed=1)
    expected = twin.params - 0.1 * twin.gradient(X[rep], y[rep], lengths[rep])
    weighted = Recurrent([3, 5, 2], 3, family="bernoulli", targets=targets_, l2=0.01, seed=1)
    trainer_for(weighted, batch_size=6, epochs=1).fit(X, y, sample_weight=w, lengths=lengths)
    np.testing.assert_allclose(weighted.params, expected, rtol=1e-12, atol=1e-15)
    fresh = Recurrent([3, 5, 2], 3, family="bernoulli", targets=targets_, l2=0.01, seed=1)
    data_loss = fresh.loss(X, y, lengths) - fresh.penalty()  # the epoch's: the penalty at its end
    assert history[0]["loss"] == pytest.approx(data_loss + rnn.penalty(), rel=1e-12)


def test_evaluate_is_the_mean_loss_over_the_targets_and_their_accuracy():
    rng = np.random.default_rng(12)
    X, lengths = sequences(rng, n=9, t=5)
    y = targets("multinomial", "every", 9, 5, 3, rng)
    rnn = Recurrent([3, 5, 3], 3, family="multinomial", targets="every", l2=0.3, seed=1)
    trainer = trainer_for(rnn, batch_size=4, epochs=0)
    loss, accuracy = trainer.evaluate(X, y, lengths=lengths)
    assert loss == pytest.approx(rnn.loss(X, y, lengths) - rnn.penalty(), rel=1e-12)
    alive = np.arange(5)[None, :] < lengths[:, None]
    right = (rnn.predict(X, lengths).argmax(axis=2) == y) & alive
    assert accuracy == pytest.approx(right.sum() / alive.sum())


def test_the_trainer_learns_a_sequence_task_and_keeps_the_best_model():
    """The sign of a running sum, read at each sequence's last step (it needs the state)."""
    from distnn import optim

    rng = np.random.default_rng(13)
    X = rng.normal(size=(300, 6, 2))
    lengths = rng.integers(2, 7, size=300)
    y = (np.cumsum(X[:, :, 0], axis=1)[np.arange(300), lengths - 1] > 0).astype(int)
    rnn = Recurrent([2, 16, 2], 8, activation="tanh", family="multinomial", seed=2)
    trainer = trainer_for(rnn, optimizer=optim.Adam(lr=0.02), batch_size=30, epochs=25,
                          clip_norm=1.0, patience=5)
    history = trainer.fit(X[:240], y[:240], X[240:], y[240:], lengths=lengths[:240],
                          lengths_val=lengths[240:])
    best = min(h["val_loss"] for h in history)
    assert trainer.evaluate(X[240:], y[240:], lengths=lengths[240:])[0] == pytest.approx(best)
    assert max(h["val_accuracy"] for h in history) >= 0.9


def test_bptt_and_lengths_are_for_recurrent_networks():
    from distnn import optim

    with pytest.raises(ValueError, match="bptt is for a Recurrent"):
        trainer_for(Network([3, 2], family="gaussian"), bptt=4)
    with pytest.raises(ValueError, match="bptt must be an integer >= 0"):
        trainer_for(Recurrent([3, 2], 2, family="gaussian"), bptt=-1)
    trainer = trainer_for(Network([3, 2], family="gaussian"), optimizer=optim.SGD(lr=0.1),
                          batch_size=2, epochs=1)
    with pytest.raises(ValueError, match="lengths are for a Recurrent"):
        trainer.fit(np.zeros((4, 3)), np.zeros(4), lengths=[1, 1, 1, 1])
    rnn = Recurrent([3, 2], 2, family="gaussian")
    assert trainer_for(rnn, bptt=5).bptt == 5 == rnn.bptt
    with pytest.raises(ValueError, match=r"expected \(N, T, 3\)"):
        trainer_for(rnn, batch_size=2).fit(np.zeros((4, 3)), np.zeros(4))


def test_the_signal_bound_of_deterministic_mode_covers_time_summed_gradients():
    """A chunk of c sequences of T steps sums c T rows per layer: |G_jk| <= c T max|P_j| max|I_k|
    (the grid step.py builds takes c T), where c alone would not bound it."""
    rng = np.random.default_rng(14)
    rnn = Recurrent([3, 6, 2], 5, activation="relu", state_activation="identity",
                    family="gaussian", targets="every", seed=2)
    X = rng.normal(size=(2, 8, 3)) + 2.0  # inputs of one sign: the steps' terms add up
    Y = rnn.check_targets(rng.normal(size=(2, 8, 2)) - 5.0, 2, None, 8)
    g = rnn.grad_buffer()
    rnn.grad_sum(X, Y, g, divisor=1)
    signals = rnn.last_signal_maxabs(X)
    gw, gb = rnn.net._grad_views(g)
    at, ratios = 0, []
    for l, (o, i) in enumerate(rnn.shapes):
        a, b = signals[at:at + o], np.append(signals[at + o:at + o + i], 1.0)
        at += o + i
        grad = np.hstack([gw[l], gb[l][:, None]])
        ratios.append((np.abs(grad) / np.maximum(np.outer(a, b), 1e-300)).max())
    assert max(ratios) <= 2 * 8  # c T, c = 2 sequences, T = 8 steps
    assert max(ratios) > 2  # c alone is exceeded


def test_deterministic_chunks_whose_rows_the_grid_cannot_bound_are_refused():
    from distnn import exactsum

    rnn = Recurrent([2, 2], 2, family="gaussian", targets="last")
    trainer = trainer_for(rnn, batch_size=4, epochs=1, deterministic=True, chunk_size=4)
    steps = exactsum.MAX_CHUNK_SIZE // 4 + 1
    with pytest.raises(ValueError, match="chunk_size 4 x .* steps"):
        trainer.fit(np.zeros((4, steps, 2), np.float32), np.zeros(4), scan=False)
