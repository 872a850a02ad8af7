"""DP-SGD (privacy.py): the clipped sum against brute force, membership and noise against their
distributions, ε against two accountants, the trainer's accounting, budget and resume, settings.

Statistical tests use fixed seeds; each states its false-alarm rate under a correct
implementation (they are deterministic, so a pass stays a pass until the code changes)."""
import math

import numpy as np
import pytest
from mpi4py import MPI
from scipy import stats

from distnn import Network, optim, privacy
from distnn.activations import NAMES as ACTIVATIONS
from distnn.config import ConfigError, parse_config
from distnn.privacy import DP, PrivacyBudgetError
from distnn.trainer import Trainer

import problems

FAMILIES = {"gaussian": 2, "multinomial": 3, "bernoulli": 2, "poisson": 2}
SELF = MPI.COMM_SELF


def per_sample_brute_force(net, X, Y, clip, divisor):
    """Σ_n min(1, C/‖g_n‖) g_n / divisor, each g_n formed whole by Network.gradient on one row
    (minus the penalty's gradient, which DP-SGD adds after the noise)."""
    penalty = net.add_penalty_grad(net.grad_buffer())
    total = np.zeros(net.n_params)
    for n in range(len(X)):
        g = net.gradient(X[n:n + 1], Y[n:n + 1]) - penalty
        total += g * min(1.0, clip / np.linalg.norm(g))
    return total / divisor


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_clipped_sum_equals_each_sample_clipped_by_brute_force(family, activation, depth):
    """One backward with P_L rows scaled by c_n is each sample's own gradient clipped, summed,
    for every family, activation and depth, with L1/L2 set (they must stay out of the clip)."""
    k = FAMILIES[family]
    X, y = problems.problem(family, 9, 4, k, seed=depth)
    net = Network([4, *[6] * depth, k], activation=activation, family=family, l1=0.01, l2=0.02,
                  seed=3)
    Y = net.check_targets(y)
    norms = net.sample_grad_norms(X, y)
    clip = float(np.median(norms))  # half the samples clipped, half not
    out = net.grad_buffer()
    loss = net.grad_sum(X, Y, out, divisor=7.5, clip=clip)
    expected = per_sample_brute_force(net, X, Y, clip, 7.5)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    assert loss == pytest.approx(net.loss_sum(X, Y), rel=1e-12)  # the loss is not clipped


def test_clipping_with_a_large_norm_changes_nothing_and_an_empty_batch_sums_zero():
    X, y = problems.problem("multinomial", 11, 4, 3, seed=0)
    net = Network([4, 5, 3], family="multinomial", seed=0)
    Y = net.check_targets(y)
    plain, clipped = net.grad_buffer(), net.grad_buffer()
    net.grad_sum(X, Y, plain, divisor=4.0)
    net.grad_sum(X, Y, clipped, divisor=4.0, clip=1e9)
    np.testing.assert_allclose(clipped, plain, rtol=1e-14, atol=1e-16)
    out = net.grad_buffer() + 1
    assert net.grad_sum(X[:0], Y[:0], out, divisor=4.0, clip=1.0) == 0.0
    assert not out.any()


def test_clipped_sum_in_float32_is_the_float64_one_to_float32_precision():
    X, y = problems.problem("multinomial", 33, 4, 3, seed=1)
    net64 = Network([4, 7, 3], family="multinomial", seed=0)
    net32 = Network([4, 7, 3], family="multinomial", seed=0, dtype="float32")
    out64, out32 = net64.grad_buffer(), net32.grad_buffer()
    net64.grad_sum(X, net64.check_targets(y), out64, divisor=10.0, clip=0.3)
    net32.grad_sum(X.astype(np.float32), net32.check_targets(y), out32, divisor=10.0, clip=0.3)
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- membership

def test_membership_depends_on_seed_and_step_only_and_its_rate_is_q():
    """Every index is in with probability q, independently: over 400 steps of n = 500 rows the
    member count is Binomial(200000, q); a two-sided test at false-alarm rate 1e-6. Per index,
    the counts over steps are Binomial(400, q): their chi-square against it (false alarm 1e-6)."""
    n, q, steps = 500, 0.1, 400
    hits = np.zeros(n)
    for t in range(steps):
        rows = privacy.members(7, t, n, q)
        assert np.all(np.diff(rows) > 0) and (len(rows) == 0 or 0 <= rows[0] and rows[-1] < n)
        np.testing.assert_array_equal(rows, privacy.members(7, t, n, q))  # a pure function
        hits[rows] += 1
    total = hits.sum()
    assert stats.binomtest(int(total), n * steps, q).pvalue > 1e-6
    chi2 = ((hits - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, n - 1) > 1e-6 and stats.chi2.cdf(chi2, n - 1) > 1e-6
    assert not np.array_equal(privacy.members(7, 0, n, q), privacy.members(8, 0, n, q))
    assert not np.array_equal(privacy.members(7, 0, n, q), privacy.members(7, 1, n, q))


def test_membership_of_a_large_set_costs_its_batch_not_its_rows():
    """Geometric gaps: the draw reaches past n in one call; q = 1 takes every row."""
    rows = privacy.members(0, 3, 10**9, 256 / 10**9)
    assert 150 < len(rows) < 400 and rows[-1] < 10**9
    np.testing.assert_array_equal(privacy.members(0, 0, 5, 1.0), np.arange(5))


# --------------------------------------------------------------------------------- noise

def test_noise_of_a_share_is_the_slice_of_the_whole_vector():
    """Any cut of the parameters, and any thread count, draws the same noise for each parameter:
    it is a function of (seed, step, parameter), not of who draws it (more: test_noise.py)."""
    n = 3 * privacy.BLOCK + 123
    whole = privacy.add_noise(np.zeros(n), 1.0, 5, 9)
    for cuts in ([0, n], [0, 100, n], [0, privacy.BLOCK - 1, 2 * privacy.BLOCK + 7, n]):
        parts = [privacy.add_noise(np.zeros(b - a), 1.0, 5, 9, start=a)
                 for a, b in zip(cuts, cuts[1:])]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    for threads in (2, 3):  # blocks shared out among threads: the same values
        np.testing.assert_array_equal(privacy.add_noise(np.zeros(n), 1.0, 5, 9, threads=threads),
                                      whole)
    assert not np.array_equal(whole, privacy.add_noise(np.zeros(n), 1.0, 5, 10))


def test_noise_mean_and_variance_are_zero_and_sigma_c_over_b_squared():
    """The noise a step adds to each parameter is N(0, (σC/B)²): over 200 steps x 500 parameters
    the standardized mean is N(0, 1) and the sum of squares chi-square(100000), each tested
    two-sided at false-alarm rate 1e-6; and parameters are uncorrelated across steps (lag-1)."""
    dp = DP(noise_multiplier=1.3, max_grad_norm=0.7)
    plan = privacy.Plan(dp, n=1000, batch_size=50, seed=11)
    std = 1.3 * 0.7 / 50
    z = np.array([plan.noise(t)(np.zeros(500)) for t in range(200)]) / std
    m = z.size
    assert 2 * stats.norm.sf(abs(z.mean()) * math.sqrt(m)) > 1e-6
    p = stats.chi2.sf((z ** 2).sum(), m)
    assert 1e-6 < p < 1 - 1e-6
    r = np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]
    assert abs(r) < 5 / math.sqrt(m)  # ~5 standard errors: false alarm < 1e-6


# ---------------------------------------------------------------------------------- accountant

def test_epsilon_is_dp_accountings_own_answer():
    import dp_accounting as dpa

    q, sigma, steps, delta = 0.02, 1.1, 1500, 1e-5
    acc = dpa.rdp.RdpAccountant(list(privacy.ORDERS))
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    assert privacy.epsilon([[q, sigma, steps]], delta) == acc.get_epsilon(delta)
    # segments compose: two halves are the whole
    assert privacy.epsilon([[q, sigma, 700], [q, sigma, 800]], delta) == pytest.approx(
        acc.get_epsilon(delta), rel=1e-12)


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.0, 3000), (0.05, 2.0, 600), (0.2, 4.0, 50)])
def test_epsilon_is_within_one_percent_of_prv_accountants_rdp(q, sigma, steps):
    """Another implementation of the same RDP bound: prv_accountant.other_accountants.RDP (Microsoft's
    prv-accountant, its port of TF Privacy's log-A series) at the same orders."""
    from prv_accountant.other_accountants import RDP
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    other = RDP([PoissonSubsampledGaussianMechanism(q, sigma)], orders=list(privacy.ORDERS))
    _, eps, _ = other.compute_epsilon(1e-5, [steps])
    assert privacy.epsilon([[q, sigma, steps]], 1e-5) == pytest.approx(eps, rel=0.01)


def test_target_epsilon_calibrates_sigma_that_spends_it(monkeypatch):
    with monkeypatch.context() as m:  # no σ in a range that cannot reach the target: one line
        m.setattr(privacy, "SIGMA", (1.0, 1.1))
        with pytest.raises(ValueError, match=r"privacy.target_epsilon: no noise_multiplier in "):
            privacy.calibrate(0.05, 400, 1e-5, 0.01)
    sigma = privacy.calibrate(0.05, 400, 1e-5, 2.0)
    assert privacy.epsilon([[0.05, sigma, 400]], 1e-5) <= 2.0
    assert privacy.epsilon([[0.05, sigma * 0.99, 400]], 1e-5) > 2.0  # and no more noise than that


# ------------------------------------------------------------------------------- the trainer

def fit(epochs=3, comm=SELF, seed=4, X_y=None, **kw):
    X, y = X_y or problems.problem("multinomial", 120, 5, 3, seed=0)
    net = Network([5, 8, 3], activation="tanh", family="multinomial", l2=1e-3, seed=1)
    kw.setdefault("privacy", DP(noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-5, noise_seed=4))
    trainer = Trainer(net, optim.SGD(lr=0.2, momentum=0.5), batch_size=20, epochs=epochs,
                      seed=seed, comm=comm, **kw)
    trainer.fit(X, y)
    return trainer


def test_a_private_epoch_is_n_over_b_steps_and_records_the_accountants_epsilon():
    trainer = fit(epochs=2)
    assert [r["step"] for r in trainer.history] == [6, 12]
    for r in trainer.history:
        assert r["epsilon"] == privacy.epsilon([[20 / 120, 1.0, r["step"]]], 1e-5)
    assert trainer.privacy_spent == [[20 / 120, 1.0, 12]]


def test_one_private_step_is_the_clipped_sum_over_b_plus_noise_then_penalty_then_sgd():
    """The step computed by hand: Σ_n clip(g_n) / B over the Poisson rows, + σC/B z_t, + the
    L2 penalty's gradient, then SGD."""
    X, y = problems.problem("multinomial", 120, 5, 3, seed=0)
    net = Network([5, 8, 3], activation="tanh", family="multinomial", l2=1e-3, seed=1)
    ref = Network(**net.spec(), seed=1)
    trainer = Trainer(net, optim.SGD(lr=0.2), batch_size=20, epochs=1, seed=4, comm=SELF,
                      privacy=DP(noise_multiplier=1.3, max_grad_norm=0.5, noise_seed=4))
    trainer._plan = trainer._private_plan(120, None)
    rows = trainer._plan.rows(0)
    Y = net.check_targets(y)
    trainer.train_batch(X, Y, rows)
    g = ref.grad_buffer()
    ref.grad_sum(X[rows], Y[rows], g, divisor=20.0, clip=0.5)
    g += 1.3 * 0.5 / 20 * privacy.add_noise(np.zeros(ref.n_params), 1.0, 4, 0)
    ref.add_penalty_grad(g)
    np.testing.assert_allclose(net.params, ref.params - 0.2 * g, rtol=1e-13, atol=1e-15)
    assert trainer.privacy_spent == [[20 / 120, 1.3, 1]]


def test_deterministic_private_training_equals_the_default_mode_to_round_off():
    a = fit(epochs=2)
    b = fit(epochs=2, deterministic=True, chunk_size=4)
    np.testing.assert_allclose(b.net.params, a.net.params, rtol=1e-10, atol=1e-12)


def test_without_a_noise_seed_each_run_draws_a_secret_key_that_checkpoints_keep(tmp_path):
    """The training seed (public: config, model file) keys neither batches nor noise: two runs
    of the same seed differ; the secret key rides in the checkpoint (resume continues it), not
    in the model."""
    from distnn import checkpoint
    from distnn.model import Model, save_model

    dp = DP(noise_multiplier=1.0, max_grad_norm=0.5)
    a, b = fit(epochs=1, privacy=dp, checkpoint_dir=tmp_path / "a"), fit(epochs=1, privacy=dp)
    assert a.noise_key != b.noise_key and a.noise_key.bit_length() > 64
    assert not np.array_equal(a.net.params, b.net.params)
    _, meta = checkpoint.load(sorted((tmp_path / "a").iterdir())[-1])
    assert int(meta["progress"]["noise_key"]) == a.noise_key
    save_model(Model(a.net, None, np.arange(3)), tmp_path / "m.npz")
    assert str(a.noise_key) not in (tmp_path / "m.npz").read_bytes().decode("latin-1")


@pytest.mark.parametrize("noise_seed", [4, None])
def test_resume_continues_parameters_and_accounting_bit_identically(tmp_path, noise_seed):
    """Resumed after epoch 2 or after epoch 1, to epoch 3: the same bits and accounting (the
    secret key, if drawn, comes from the checkpoint)."""
    part = fit(epochs=2, checkpoint_dir=tmp_path,
               privacy=DP(noise_multiplier=1.0, max_grad_norm=0.5, noise_seed=noise_seed))
    whole = Trainer.resume(sorted(tmp_path.iterdir())[0], comm=SELF, epochs=3,
                           checkpoint_dir=None)  # from epoch 1: the same key, by the checkpoint
    whole.fit(*problems.problem("multinomial", 120, 5, 3, seed=0))
    path = sorted(tmp_path.iterdir())[-1]
    resumed = Trainer.resume(path, comm=SELF, epochs=3)
    assert resumed.privacy_spent == part.privacy_spent
    X, y = problems.problem("multinomial", 120, 5, 3, seed=0)
    resumed.fit(X, y)
    np.testing.assert_array_equal(resumed.net.params, whole.net.params)
    assert resumed.privacy_spent == whole.privacy_spent
    assert resumed.history[-1]["epsilon"] == whole.history[-1]["epsilon"]
    if noise_seed is not None:  # and as a run never interrupted
        np.testing.assert_array_equal(fit(epochs=3).net.params, whole.net.params)


def test_target_epsilon_alone_spends_it_and_more_epochs_on_resume_are_refused(tmp_path):
    trainer = fit(epochs=2, checkpoint_dir=tmp_path,
                  privacy=DP(target_epsilon=3.0, max_grad_norm=0.5, noise_seed=4))
    assert trainer.history[-1]["epsilon"] <= 3.0 * (1 + 1e-6)
    assert trainer.history[-1]["epsilon"] > 2.9  # calibrated for these 12 steps, not fewer
    sigma = trainer.privacy.noise_multiplier
    files = sorted(tmp_path.iterdir())
    resumed = Trainer.resume(files[-1], comm=SELF, epochs=3)
    assert resumed.privacy.noise_multiplier == sigma  # not recalibrated for 3 epochs
    X, y = problems.problem("multinomial", 120, 5, 3, seed=0)
    params = resumed.net.params.copy()
    with pytest.raises(PrivacyBudgetError, match=r"6 more steps would spend ε = .* over "
                                                  r"target_epsilon = 3"):
        resumed.fit(X, y)
    np.testing.assert_array_equal(resumed.net.params, params)  # not a step taken
    assert sorted(tmp_path.iterdir()) == files  # nor a checkpoint written


def test_an_empty_poisson_batch_is_a_step_of_noise_alone():
    """At q = 1/120 many steps sample no row: the step still runs (noise and penalty)."""
    t = fit(epochs=1, X_y=problems.problem("multinomial", 120, 5, 3, seed=0),
            privacy=DP(noise_multiplier=1.0, max_grad_norm=0.5, noise_seed=4))
    t2 = Trainer(Network([5, 8, 3], activation="tanh", seed=1), optim.SGD(lr=0.2), batch_size=1,
                 epochs=1, seed=4, comm=SELF, privacy=DP(noise_multiplier=1.0, noise_seed=4))
    X, y = problems.problem("multinomial", 120, 5, 3, seed=0)
    sizes = [len(privacy.members(4, s, 120, 1 / 120)) for s in range(120)]
    assert 0 in sizes
    before = t2.net.params.copy()
    t2.fit(X, y)
    assert t2.step == 120 and not np.array_equal(t2.net.params, before)
    assert t.step == 6


@pytest.mark.parametrize("kw, message", [
    ({"clip_norm": 1.0}, "clip_norm with privacy"),
])
def test_conflicting_trainer_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        fit(**kw)


def test_sample_weights_with_privacy_are_refused():
    X, y = problems.problem("multinomial", 120, 5, 3, seed=0)
    net = Network([5, 8, 3], seed=1)
    t = Trainer(net, batch_size=20, epochs=1, comm=SELF, privacy=DP(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="sample_weight with privacy"):
        t.fit(X, y, sample_weight=np.ones(120))


@pytest.mark.parametrize("settings, message", [
    ({}, "give noise_multiplier or target_epsilon"),
    ({"noise_multiplier": 0.0}, r"privacy.noise_multiplier: expected a finite number in \[0.01, 1e\+06\]"),
    ({"noise_multiplier": 1e308}, r"privacy.noise_multiplier"),
    ({"target_epsilon": 1e3}, r"privacy.target_epsilon: expected a finite number in \(0, 100\]"),
    ({"noise_multiplier": 1.0, "max_grad_norm": -1.0}, r"privacy.max_grad_norm"),
    ({"noise_multiplier": 1.0, "delta": 1.0}, r"privacy.delta: expected a finite number in"),
    ({"target_epsilon": float("inf")}, r"privacy.target_epsilon"),
    ({"noise_multiplier": 1.0, "epsilon": 2.0}, r"unknown settings \['epsilon'\]"),
])
def test_bad_privacy_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message) as e:
        DP.of(settings)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("section, message", [
    ({"max_grad_norm": 1.0}, "privacy.max_grad_norm: a \\[privacy\\] section turns DP-SGD on, and "
                             "needs privacy.noise_multiplier or privacy.target_epsilon"),
    ({}, "privacy: a \\[privacy\\] section turns DP-SGD on"),
    ({"noise_multiplier": -1.0}, r"privacy.noise_multiplier: expected 0 \(unset\) or a value in "
                                 r"\[0.01, 1e\+06\]"),
    ({"target_epsilon": 1e308}, r"privacy.target_epsilon: expected 0 \(unset\) or a value in"),
    ({"noise_multiplier": 1.0, "delta": 2.0}, r"privacy.delta: expected a value in \(0, 1\)"),
    ({"noise_multiplier": 1.0, "sigma": 2.0}, r"privacy.sigma: unknown key"),
])
def test_bad_privacy_config_values_are_one_line_errors(section, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_config({"data": {"source": "sklearn:digits"}, "privacy": section})
    assert "\n" not in str(e.value)


def test_a_config_with_privacy_gives_the_trainer_dp_and_refuses_clip_norm():
    cfg = parse_config({"data": {"source": "sklearn:digits"},
                        "privacy": {"noise_multiplier": 1.2, "max_grad_norm": 0.5}})
    assert cfg.privacy.dp() == DP(noise_multiplier=1.2, max_grad_norm=0.5, delta=1e-5)
    cfg = parse_config({"data": {"source": "sklearn:digits"},
                        "privacy": {"target_epsilon": 2.0, "noise_seed": 0}})
    assert cfg.privacy.dp() == DP(target_epsilon=2.0, noise_seed=0)
    assert parse_config({"data": {"source": "sklearn:digits"}}).privacy.dp() is None
    with pytest.raises(ConfigError, match="optim.clip_norm: .*privacy"):
        parse_config({"data": {"source": "sklearn:digits"}, "optim": {"clip_norm": 1.0},
                      "privacy": {"noise_multiplier": 1.0}})


# ------------------------------------------------------------------------------- estimators

def test_a_private_classifier_reports_epsilon_and_partial_fit_continues_the_accounting():
    from distnn import MLPClassifier

    X, y = problems.problem("multinomial", 120, 5, 3, seed=0)
    dp = DP(noise_multiplier=1.2, max_grad_norm=0.5)
    clf = MLPClassifier((8,), max_iter=3, batch_size=20, random_state=0, privacy=dp,
                        comm=SELF).fit(X, y)
    assert clf.n_iter_ == 3  # no stop on the (non-private) training loss
    assert clf.epsilon_ == privacy.epsilon([[20 / 120, 1.2, 18]], 1e-5)
    first = clf.coefs_[0].copy()
    clf.partial_fit(X, y)  # fresh batches and noise (steps 18..23), the accounting continued
    assert clf.epsilon_ == privacy.epsilon([[20 / 120, 1.2, 24]], 1e-5)
    assert not np.array_equal(first, clf.coefs_[0])
    with pytest.raises(ValueError, match="sample_weight with privacy"):
        MLPClassifier((8,), max_iter=1, privacy=dp, comm=SELF).fit(X, y, sample_weight=np.ones(120))


def test_a_private_regressor_starts_its_output_bias_at_zero_not_at_the_targets_mean():
    from distnn import MLPRegressor

    X, y = problems.problem("gaussian", 60, 5, 1, seed=0)
    y = y.ravel() + 100.0
    reg = MLPRegressor((4,), max_iter=1, batch_size=10, random_state=0, learning_rate_init=1e-9,
                       privacy={"noise_multiplier": 1.0}, comm=SELF).fit(X, y)
    assert abs(reg.intercepts_[-1][0]) < 1e-3
    plain = MLPRegressor((4,), max_iter=1, batch_size=10, random_state=0,
                         learning_rate_init=1e-9, comm=SELF).fit(X, y)
    assert plain.intercepts_[-1][0] == pytest.approx(y.mean())


def test_the_deterministic_step_grows_its_chunk_rows_for_a_batch_above_the_expected_size():
    """A Poisson batch may exceed the rows the exact sum was sized for; the step makes room (every
    rank alike) and the result still equals the default mode's."""
    t = Trainer(Network([5, 8, 3], activation="tanh", l2=1e-3, seed=1),
                optim.SGD(lr=0.2, momentum=0.5),
                batch_size=20, epochs=2, seed=4, comm=SELF, deterministic=True, chunk_size=4,
                privacy=DP(noise_multiplier=1.0, max_grad_norm=0.5, noise_seed=4))
    t.stepper.rows = t.stepper.rows[:2]  # room for 8 rows only
    t.stepper.stats = t.stepper.stats[:2]
    t.fit(*problems.problem("multinomial", 120, 5, 3, seed=0))
    assert len(t.stepper.rows) > 2
    ref = fit(epochs=2)
    np.testing.assert_allclose(t.net.params, ref.net.params, rtol=1e-10, atol=1e-12)


def test_a_config_round_trips_through_toml_with_and_without_privacy():
    from distnn.config import from_dict, to_dict, to_toml

    for extra in ({}, {"privacy": {"target_epsilon": 2.0, "delta": 1e-6}}):
        cfg = parse_config({"data": {"source": "sklearn:digits"}, **extra})
        assert from_dict(to_dict(cfg)) == cfg
        import tomllib
        assert parse_config(tomllib.loads(to_toml(cfg))) == cfg
        assert ("[privacy]" in to_toml(cfg)) == bool(extra)
