"""Sample weights: a weight scales its sample's proxy error, so integer weights are repeated rows
and zero weights removed ones; and the Trainer's plain-Python inputs (lists, string labels)."""

import numpy as np
import pytest

from distnn import Network, optim
from distnn.model import load_model, save_model
from distnn.trainer import Trainer

import problems

FAMILIES = ["gaussian", "bernoulli", "multinomial", "poisson"]


def weighted_problem(family, n=23, seed=0):
    X, y = problems.problem(family, n, 5, 3, seed)
    w = np.random.default_rng(seed).integers(0, 4, n)  # zeros included
    w[0] = max(w[0], 1)
    return X, y, w


@pytest.mark.parametrize("family", FAMILIES)
def test_integer_weights_give_the_loss_and_gradient_of_repeated_rows(family):
    X, y, w = weighted_problem(family)
    net = Network([5, 7, 3], activation="tanh", family=family, seed=1)
    Y = net.check_targets(y, len(X))
    g_w, g_r = net.grad_buffer(), net.grad_buffer()
    loss_w = net.grad_sum(X, Y, g_w, divisor=w.sum(), weights=w.astype(np.float64))
    Xr, Yr = X.repeat(w, axis=0), Y.repeat(w, axis=0)
    loss_r = net.grad_sum(Xr, Yr, g_r, divisor=len(Xr))
    assert loss_w == pytest.approx(loss_r, rel=1e-12)
    np.testing.assert_allclose(g_w, g_r, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_a_full_batch_fit_with_integer_weights_is_the_fit_on_repeated_rows(family, deterministic):
    """With the whole data set as the batch, only the order of the sums differs."""
    X, y, w = weighted_problem(family)
    Xr, yr = X.repeat(w, axis=0), y.repeat(w, axis=0)

    def fit(X, y, w, batch):
        net = Network([5, 7, 3], activation="tanh", family=family, l2=1e-3, seed=1)
        trainer = Trainer(net, optim.Adam(lr=0.01), batch_size=batch, epochs=30, seed=2,
                          deterministic=deterministic, chunk_size=8)
        history = trainer.fit(X, y, sample_weight=w)
        trainer.close()
        return net.params, history

    weighted, h_w = fit(X, y, w, len(X))
    repeated, h_r = fit(Xr, yr, None, len(Xr))
    np.testing.assert_allclose(weighted, repeated, rtol=1e-9, atol=1e-12)
    assert h_w[-1]["loss"] == pytest.approx(h_r[-1]["loss"], rel=1e-9)


def test_weights_are_checked():
    X, y, _ = weighted_problem("gaussian")
    trainer = Trainer(Network([5, 3], family="gaussian"), batch_size=5, epochs=1)
    for w, match in [(np.ones(3), "one per sample"), (-np.ones(len(X)), "finite and >= 0"),
                     (np.zeros(len(X)), "0 for every sample")]:
        with pytest.raises(ValueError, match=match):
            trainer.fit(X, y, sample_weight=w)


def test_trainer_takes_lists_and_string_labels_and_its_model_decodes_them(tmp_path):
    X, codes = problems.problem("multinomial", 40, 5, 3, 0)
    names = np.array(["cat", "dog", "emu"])
    net = Network([5, 8, 3], family="multinomial", seed=1)
    trainer = Trainer(net, optim.Adam(lr=0.02), batch_size=8, epochs=5)
    trainer.fit(X.tolist(), names[codes].tolist())
    assert trainer.classes.tolist() == ["cat", "dog", "emu"]
    save_model(trainer, tmp_path / "m.npz")
    model = load_model(tmp_path / "m.npz")
    assert np.array_equal(model.predict(X), names[net.predict(X).argmax(axis=1)])
    assert model.score(X, names[codes]) == pytest.approx(
        np.mean(net.predict(X).argmax(axis=1) == codes))
    with pytest.raises(ValueError, match="2 class labels"):
        Trainer(Network([5, 3]), batch_size=8, epochs=1).fit(X, names[codes % 2])


def test_a_callback_that_returns_true_stops_after_that_epoch():
    X, y = problems.problem("gaussian", 20, 5, 3, 0)
    trainer = Trainer(Network([5, 3], family="gaussian"), batch_size=5, epochs=10,
                      callback=lambda record: record["epoch"] == 3)
    assert len(trainer.fit(X, y)) == 3


def test_shuffle_false_takes_the_rows_in_order():
    X, y = problems.problem("gaussian", 20, 5, 3, 0)
    seen = []
    trainer = Trainer(Network([5, 3], family="gaussian"), batch_size=5, epochs=2, shuffle=False)
    original = trainer.train_batch
    trainer.train_batch = lambda X, Y, rows, *a: seen.append(rows.tolist()) or original(X, Y, rows, *a)
    trainer.fit(X, y)
    assert seen == [list(range(lo, lo + 5)) for lo in range(0, 20, 5)] * 2
