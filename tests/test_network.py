"""The network math: proxy-error gradients, Jacobians, overflow safety, dtypes and input checks."""

import itertools

import numpy as np
import pytest

from distnn import activations, families
from distnn.network import Network, layer_shapes, layout, n_params
from problems import random_targets

FAMILIES = families.NAMES
ACTIVATIONS = activations.NAMES


def numeric_grad(f, x, h=1e-6):
    """Central differences of scalar f with respect to the vector x (modified in place, restored)."""
    g = np.zeros_like(x)
    for i in range(x.size):
        keep = x[i]
        x[i] = keep + h
        up = f()
        x[i] = keep - h
        down = f()
        x[i] = keep
        g[i] = (up - down) / (2 * h)
    return g


def rel_err(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)


def random_net(family, activation, hidden, l1=0.0, l2=0.0, seed=0, n_in=4):
    k = 3 if family == "multinomial" else 2
    return Network([n_in, *hidden, k], activation=activation, family=family, l1=l1, l2=l2, seed=seed)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("penalty", [(0.0, 0.0), (0.03, 0.05)], ids=["plain", "l1+l2"])
@pytest.mark.parametrize("hidden", [[], [5], [6, 4], [5, 4, 3]], ids=lambda h: f"{len(h) + 1}layers")
def test_gradient_equals_central_differences(family, activation, penalty, hidden):
    rng = np.random.default_rng(len(hidden) * 7 + len(family))
    net = random_net(family, activation, hidden, *penalty, seed=3)
    net.biases[0][...] = rng.normal(scale=0.3, size=net.biases[0].shape)  # leave the symmetric start
    X = rng.normal(size=(7, 4))
    y = random_targets(family, 7, net.sizes[-1], rng)
    grad = net.gradient(X, y)
    numeric = numeric_grad(lambda: net.loss(X, y), net.params)
    assert rel_err(grad, numeric) <= 1e-6


def test_network_without_hidden_layers_is_the_glm_closed_form():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(50, 4)), rng.integers(0, 3, size=50)
    net = Network([4, 3], family="multinomial", l2=0.1)
    z = X @ net.weights[0].T + net.biases[0]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = p - np.eye(3)[y]
    expected_w = err.T @ X / 50 + 2 * 0.1 * net.weights[0]
    expected_b = err.mean(0)
    g = net.gradient(X, y)
    np.testing.assert_allclose(g[:12].reshape(3, 4), expected_w, rtol=1e-12)
    np.testing.assert_allclose(g[12:], expected_b, rtol=1e-12, atol=1e-15)
    nll = -np.log(p[np.arange(50), y]).mean() + 0.1 * (net.weights[0] ** 2).sum()
    assert net.loss(X, y) == pytest.approx(nll, rel=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_sums_add_over_any_split_of_the_batch(family):
    """What data parallelism relies on: the sum over a batch is the sum of the sums of its parts."""
    rng = np.random.default_rng(2)
    net = random_net(family, "tanh", [6])
    X = rng.normal(size=(30, 4))
    Y = net.check_targets(random_targets(family, 30, net.sizes[-1], rng))
    whole = net.grad_buffer()
    whole_loss = net.grad_sum(X, Y, whole)
    parts, part_loss = net.grad_buffer(), 0.0
    for lo, hi in [(0, 11), (11, 11), (11, 29), (29, 30)]:  # includes an empty part
        g = net.grad_buffer()
        part_loss += net.grad_sum(X[lo:hi], Y[lo:hi], g)
        parts += g
    np.testing.assert_allclose(parts, whole, rtol=1e-12, atol=1e-12)
    assert part_loss == pytest.approx(whole_loss, rel=1e-12)
    assert whole_loss == pytest.approx(net.loss_sum(X, Y), rel=1e-13)  # the fused softmax loss too


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_share_divided_by_the_global_count_adds_up_to_the_mean(family):
    """Ranks divide P_L by the global batch size: their shares add up to the mean gradient."""
    rng = np.random.default_rng(5)
    net = random_net(family, "softplus", [6, 5])
    X = rng.normal(size=(30, 4))
    y = random_targets(family, 30, net.sizes[-1], rng)
    Y = net.check_targets(y)
    total = net.grad_buffer()
    for lo, hi in [(0, 13), (13, 30)]:
        g = net.grad_buffer()
        loss = net.grad_sum(X[lo:hi], Y[lo:hi], g, divisor=30)
        assert loss == pytest.approx(net.loss_sum(X[lo:hi], Y[lo:hi]), rel=1e-13)  # not divided
        total += g
    plain = net.grad_buffer()
    net.grad_sum(X, Y, plain)
    np.testing.assert_allclose(total, plain / 30, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(net.gradient(X, y), plain / 30, rtol=1e-12, atol=1e-15)


def test_empty_batch_contributes_nothing():
    net = random_net("multinomial", "relu", [5])
    g = np.full(net.n_params, 7.0)
    assert net.grad_sum(np.zeros((0, 4)), net.check_targets(np.zeros(0, int)), g) == 0.0
    assert not g.any()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ["tanh", "softplus", "sigmoid", "leaky_relu"])
def test_input_jacobian_equals_finite_differences(family, activation):
    rng = np.random.default_rng(4)
    net = random_net(family, activation, [5, 4])
    X = rng.normal(size=(3, 4))
    jac = net.input_jacobian(X)
    assert jac.shape == (3, net.sizes[-1], 4)
    for n, k in itertools.product(range(3), range(net.sizes[-1])):
        x = X[n].copy()
        numeric = numeric_grad(lambda: net.predict(x[None])[0, k], x)
        assert rel_err(jac[n, k], numeric) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_param_jacobian_equals_finite_differences(family):
    rng = np.random.default_rng(5)
    net = random_net(family, "tanh", [4])
    X = rng.normal(size=(2, 4))
    jac = net.param_jacobian(X)
    assert jac.shape == (2, net.sizes[-1], net.n_params)
    for n, k in itertools.product(range(2), range(net.sizes[-1])):
        numeric = numeric_grad(lambda: net.predict(X[n:n + 1])[0, k], net.params)
        assert rel_err(jac[n, k], numeric) <= 1e-6


def test_param_jacobian_contracted_with_the_residual_is_the_gaussian_gradient():
    rng = np.random.default_rng(6)
    net = random_net("gaussian", "relu", [5])
    X, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    jac = net.param_jacobian(X)
    resid = net.predict(X) - y
    np.testing.assert_allclose(np.einsum("nk,nkp->p", resid, jac) / 8, net.gradient(X, y), rtol=1e-10)


def test_sample_gradient_norms_are_the_norms_of_per_sample_gradients():
    rng = np.random.default_rng(7)
    net = random_net("multinomial", "relu", [6, 5])
    X, y = rng.normal(size=(6, 4)), rng.integers(0, 3, size=6)
    expected = [np.linalg.norm(net.gradient(X[i:i + 1], y[i:i + 1])) for i in range(6)]
    np.testing.assert_allclose(net.sample_grad_norms(X, y), expected, rtol=1e-10)


def glm_with_logits(family, logits, dtype):
    """A one-layer net whose logits for the input [[1]] are exactly `logits`."""
    net = Network([1, len(logits)], family=family, dtype=dtype)
    net.weights[0][:, 0] = logits
    net.biases[0][...] = 0
    return net


@pytest.mark.parametrize("dtype,big", [(np.float32, 1e4), (np.float64, 1e300)])
def test_softmax_and_its_loss_never_overflow(dtype, big):
    net = glm_with_logits("multinomial", [big, -big, 0.0], dtype)
    X = np.ones((1, 1), dtype)
    p = net.predict(X)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.0]])
    assert net.loss(X, [0]) == 0.0  # true loss is log(1 + e^-big + e^-2big) ~ 0
    assert net.loss(X, [1]) == pytest.approx(2 * big, rel=1e-6)  # finite although huge
    assert net.loss(X, [2]) == pytest.approx(big, rel=1e-6)
    # gradient w.r.t. the bias is p - onehot(y), exactly
    nw = 3
    np.testing.assert_array_equal(net.gradient(X, [1])[nw:], [1.0, -1.0, 0.0])


@pytest.mark.parametrize("dtype,big", [(np.float32, 1e4), (np.float64, 1e300)])
def test_bernoulli_is_stable_at_extreme_logits(dtype, big):
    net = glm_with_logits("bernoulli", [big, -big], dtype)
    X = np.ones((1, 1), dtype)
    np.testing.assert_array_equal(net.predict(X), [[1.0, 0.0]])
    assert net.loss(X, [[1, 0]]) == 0.0
    assert net.loss(X, [[0, 1]]) == pytest.approx(2 * big, rel=1e-6)
    np.testing.assert_array_equal(net.gradient(X, [[0, 1]])[2:], [1.0, -1.0])


def test_sigmoid_keeps_relative_precision_in_the_tail():
    net = glm_with_logits("bernoulli", [-50.0], np.float64)
    assert net.predict(np.ones((1, 1)))[0, 0] == pytest.approx(np.exp(-50.0), rel=1e-12)


def test_softmax_rows_sum_to_one():
    rng = np.random.default_rng(8)
    net = Network([5, 10], family="multinomial")
    net.weights[0][...] = rng.normal(scale=300, size=(10, 5))
    p = net.predict(rng.normal(size=(100, 5)))
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-14)


def test_poisson_overflow_is_an_inf_loss_with_a_warning_never_nan():
    net = glm_with_logits("poisson", [1000.0], np.float64)
    with pytest.warns(RuntimeWarning, match="poisson: exp\\(logit\\) overflowed"):
        loss = net.loss(np.ones((1, 1)), [[3.0]])
    assert loss == np.inf


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_network_stays_float32(family):
    rng = np.random.default_rng(9)
    net = Network([4, 6, 3], activation="tanh", family=family, l1=0.01, l2=0.01, dtype="float32")
    X = rng.normal(size=(5, 4))  # float64 input is cast down, never the network up
    y = random_targets(family, 5, 3, rng)
    assert net.params.dtype == np.float32 and all(w.dtype == np.float32 for w in net.weights)
    assert net.predict(X).dtype == np.float32
    assert net.gradient(X, y).dtype == np.float32
    assert net.input_jacobian(X).dtype == np.float32
    assert net.param_jacobian(X).dtype == np.float32
    assert np.isfinite(net.loss(X, y))
    g64 = Network([4, 6, 3], activation="tanh", family=family, l1=0.01, l2=0.01).gradient(X, y)
    np.testing.assert_allclose(net.gradient(X, y), g64, rtol=1e-3, atol=1e-5)


def test_parameters_are_views_of_one_contiguous_vector():
    net = Network([3, 4, 2])
    assert net.params.flags.c_contiguous and net.params.size == 3 * 4 + 4 + 4 * 2 + 2
    for w, b in zip(net.weights, net.biases):
        assert np.shares_memory(w, net.params) and np.shares_memory(b, net.params)
    net.params[:] = np.arange(net.n_params)
    np.testing.assert_array_equal(net.weights[0], np.arange(12).reshape(4, 3))
    np.testing.assert_array_equal(net.biases[0], np.arange(12, 16))
    np.testing.assert_array_equal(net.weights[1], np.arange(16, 24).reshape(2, 4))


def test_the_layout_helpers_describe_the_networks_vector():
    sizes = [3, 4, 2]
    assert layer_shapes(sizes) == [(4, 3), (2, 4)]
    assert layout(layer_shapes(sizes)) == [(slice(0, 12), slice(12, 16)), (slice(16, 24), slice(24, 26))]
    net = Network(sizes)
    assert n_params(sizes) == net.n_params == len(net.params) == 26
    for (w_at, b_at), w, b in zip(layout(layer_shapes(sizes)), net.weights, net.biases):
        assert np.shares_memory(net.params[w_at], w) and np.shares_memory(net.params[b_at], b)


@pytest.mark.parametrize("family,classifier,decisions", [
    ("gaussian", False, None), ("bernoulli", True, 3), ("multinomial", True, 1), ("poisson", False, None)])
def test_the_family_says_what_the_network_decides(family, classifier, decisions):
    net = Network([4, 5, 3], family=family)
    assert net.is_classifier is classifier and net.decisions == decisions
    X, y = np.random.default_rng(0).normal(size=(6, 4)), random_targets(family, 6, 3, np.random.default_rng(1))
    correct = net.eval_sums(net.check_inputs(X), net.check_targets(y))[1]
    assert (correct is not None) is classifier
    assert correct is None or 0 <= correct <= 6 * decisions


def test_initialization_is_reproducible_from_the_seed_and_scaled_by_activation():
    a, b = Network([300, 200, 2], seed=5), Network([300, 200, 2], seed=5)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, Network([300, 200, 2], seed=6).params)
    assert a.weights[0].std() == pytest.approx(np.sqrt(2 / 300), rel=0.05)  # He for relu
    t = Network([300, 200, 2], activation="tanh")
    assert t.weights[0].std() == pytest.approx(np.sqrt(2 / 500), rel=0.05)  # Glorot
    assert not a.biases[0].any()


def test_spec_rebuilds_the_same_architecture():
    net = Network([3, 5, 2], activation="softplus", family="poisson", l1=0.1, dtype="float32")
    twin = Network(**net.spec())
    assert twin.spec() == net.spec() and twin.n_params == net.n_params


BAD_CONSTRUCTION = [
    (dict(sizes=[3, 0, 2]), "layer size 1 must be an integer >= 1"),
    (dict(sizes=[3, 2.5, 2]), "layer size 1 must be an integer"),
    (dict(sizes=[3]), "at least an input and an output"),
    (dict(sizes=[3, 2], activation="rleu"), "unknown activation 'rleu'"),
    (dict(sizes=[3, 2], family="normal"), "unknown family 'normal'"),
    (dict(sizes=[3, 1], family="multinomial"), "at least 2 outputs"),
    (dict(sizes=[3, 2], l2=-1.0), "l2 must be a finite number >= 0"),
    (dict(sizes=[3, 2], dtype="float16"), "dtype must be float32 or float64"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONSTRUCTION)
def test_bad_construction_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Network(**kwargs)


BAD_DATA = [
    ("multinomial", np.ones((4, 5)), [0, 1, 2, 0], r"X has shape \(4, 5\); expected \(N, 3\)"),
    ("multinomial", np.ones(3), [0], r"X has shape \(3,\)"),
    ("multinomial", [[1, np.nan, 1]] * 2, [0, 1], "X contains NaN or Inf \\(first at row 0, column 1\\)"),
    ("gaussian", [[1, 1, np.inf]] * 2, [0.0, 1.0], "X contains NaN or Inf"),
    ("multinomial", np.ones((2, 3)), [0, 2], "label 2 at row 1 is outside 0..1"),
    ("multinomial", np.ones((2, 3)), [0, -1], "label -1 at row 1 is outside 0..1"),
    ("multinomial", np.ones((2, 3)), [0, 0.5], "integer class labels; row 1 has 0.5"),
    ("multinomial", np.ones((2, 3)), ["a", "b"], "integer class labels"),
    ("multinomial", np.ones((2, 3)), [0, 1, 1], "X has 2 rows but y has 3"),
    ("poisson", np.ones((2, 3)), [[1.0, 2], [-1, 0]], "non-negative counts; row 1 has -1"),
    ("bernoulli", np.ones((2, 3)), [[1, 0], [0.5, 1]], "must be 0 or 1; row 1 has 0.5"),
    ("gaussian", np.ones((2, 3)), [[1.0, np.nan], [0, 0]], "targets contain NaN or Inf"),
    ("gaussian", np.ones((2, 3)), [1.0, 2.0], r"targets have shape \(2,\); expected \(N, 2\)"),
]


@pytest.mark.parametrize("family,X,y,message", BAD_DATA)
def test_bad_data_is_a_clear_error(family, X, y, message):
    net = Network([3, 2], family=family)
    with pytest.raises(ValueError, match=message):
        net.gradient(X, y)
