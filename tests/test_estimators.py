"""The scikit-learn estimators: scikit-learn's own estimator checks, its conventions (clone,
pickle, pipelines, grid search, partial_fit, warm_start), agreement with sklearn.neural_network,
and one model file for the API and the command line."""

import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_digits, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks  # noqa: E402

import distnn  # noqa: E402
from distnn import MLPClassifier, MLPRegressor, load_model, save_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
              pytest.mark.skipif("PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ,
                                 reason="1-rank tests; test_estimators_mpi.py runs under mpiexec")]


@parametrize_with_checks([MLPClassifier(), MLPRegressor(), MLPClassifier(family="multinomial")])
def test_scikit_learn_estimator_checks(estimator, check):
    """Every check of the installed scikit-learn, none expected to fail (pandas-based checks
    skip themselves where pandas is not installed)."""
    check(estimator)


def test_the_poisson_regressor_passes_every_check_but_one_that_ignores_its_target_tag():
    """check_regressor_multioutput fits make_regression's negative targets without applying the
    positive_only tag (scikit-learn 1.9.1), which a Poisson likelihood cannot take. The default
    learning rate needs more than 200 full-batch epochs on the checks' 200 samples, so 0.01."""
    estimator = MLPRegressor(family="poisson", learning_rate_init=0.01)
    assert estimator.__sklearn_tags__().target_tags.positive_only
    results = check_estimator(estimator, on_fail=None)
    failed = {r["check_name"]: str(r["exception"]) for r in results if r["status"] == "failed"}
    assert list(failed) == ["check_regressor_multioutput"]
    assert "non-negative targets" in failed["check_regressor_multioutput"]


def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16, y


def test_accuracy_is_that_of_scikit_learns_mlp_on_digits():
    from sklearn.neural_network import MLPClassifier as Reference

    X, y = digits()
    kw = dict(hidden_layer_sizes=(32,), max_iter=40, random_state=0)
    ours = cross_val_score(MLPClassifier(**kw), X, y, cv=3).mean()
    theirs = cross_val_score(Reference(**kw), X, y, cv=3).mean()
    assert ours > 0.85 and abs(ours - theirs) < 0.03  # 0.890 and 0.891 measured


def test_labels_of_any_type_and_the_probabilities():
    X, y = digits()
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])[y]
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=20, learning_rate_init=0.01,
                        random_state=0).fit(X, names)
    assert sorted(clf.classes_) == list(clf.classes_) and set(clf.predict(X)) <= set(names)
    p = clf.predict_proba(X)
    np.testing.assert_allclose(p.sum(axis=1), 1)
    assert np.array_equal(clf.classes_[p.argmax(axis=1)], clf.predict(X))
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(p))
    assert clf.score(X, names) > 0.9
    binary = MLPClassifier(max_iter=20, random_state=0).fit(X, np.where(y < 5, 1.0, -2.0))
    assert binary.classes_.tolist() == [-2.0, 1.0] and binary.predict_proba(X).shape == (len(X), 2)


def test_multilabel_targets_take_one_bernoulli_output_each():
    X, y = digits()
    Y = np.stack([y % 2, y > 4], axis=1).astype(int)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0).fit(X, Y)
    assert clf.predict(X).shape == Y.shape and clf.out_activation_ == "logistic"
    assert clf.score(X, Y) > 0.8  # both labels right


def test_sample_weights_are_repeated_samples_for_a_full_batch():
    X, y = digits()
    X, y = X[:150], y[:150]
    w = np.random.default_rng(0).integers(0, 3, len(X))
    a = MLPClassifier(hidden_layer_sizes=(8,), max_iter=15, random_state=0)
    b = clone(a)
    a.fit(X, y, sample_weight=w)
    b.fit(X.repeat(w, axis=0), y.repeat(w))
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-10)


def test_the_attributes_have_scikit_learns_shapes_and_coefs_are_views():
    X, y = digits()
    clf = MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=3, random_state=0).fit(X, y)
    assert [c.shape for c in clf.coefs_] == [(64, 16), (16, 8), (8, 10)]
    assert [b.shape for b in clf.intercepts_] == [(16,), (8,), (10,)]
    assert clf.n_iter_ == 3 == len(clf.loss_curve_) and clf.t_ == 3 * len(X)
    assert clf.loss_ == clf.loss_curve_[-1] and clf.best_loss_ == min(clf.loss_curve_)
    assert clf.n_features_in_ == 64 and clf.n_layers_ == 4 and clf.n_outputs_ == 10
    before = clf.predict_proba(X[:3])
    clf.coefs_[-1][...] = 0
    clf.intercepts_[-1][...] = 0
    np.testing.assert_allclose(clf.predict_proba(X[:3]), 0.1)  # the views are the network
    assert not np.allclose(before, 0.1)


def test_pickle_keeps_the_network_whole():
    X, y = digits()
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)
    again = pickle.loads(pickle.dumps(clf))
    assert np.array_equal(again.predict_proba(X), clf.predict_proba(X))
    again.coefs_[0][...] = 0  # still views of the restored network
    assert not np.array_equal(again.predict_proba(X), clf.predict_proba(X))
    again.partial_fit(X, y)  # and it trains on
    assert again.n_iter_ == 4


def test_partial_fit_continues_the_optimizer_and_warm_start_the_weights():
    X, y = digits()
    clf = MLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X, y)
    for _ in range(3):
        clf.partial_fit(X[:900], y[:900], classes=np.arange(10))
    assert clf.n_iter_ == 3 and clf._optimizer.t == 3 * 5
    with pytest.raises(ValueError, match="not in classes"):
        MLPClassifier().partial_fit(X, y, classes=[0, 1])
    warm = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, warm_start=True, random_state=0)
    first = warm.fit(X, y).loss_
    warm.fit(X, y)
    assert warm.loss_curve_[5] < first and len(warm.loss_curve_) == 10 and warm.n_iter_ == 5


def test_tol_stops_training_and_max_iter_warns():
    X, y = digits()
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y)
    clf = MLPClassifier(hidden_layer_sizes=(8,), tol=10.0, n_iter_no_change=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf.fit(X, y)
    assert clf.n_iter_ == 4  # the first epoch improves on inf, the next 3 fail by 10: 3 > 2


def test_early_stopping_keeps_the_best_validation_score():
    X, y = digits()
    clf = MLPClassifier(hidden_layer_sizes=(16,), early_stopping=True, n_iter_no_change=3,
                        max_iter=60, random_state=0).fit(X, y)
    assert clf.best_loss_ is None and clf.best_validation_score_ == max(clf.validation_scores_)
    assert len(clf.validation_scores_) == clf.n_iter_ < 60
    with pytest.raises(ValueError, match="early_stopping"):
        clf.partial_fit(X, y)


def test_pipeline_grid_search_and_cross_validation_work():
    X, y = load_breast_cancer(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(8,), max_iter=20,
                                                         learning_rate_init=0.01, random_state=0))
    search = GridSearchCV(pipe, {"mlpclassifier__l2": [0.0, 1e-3],
                                 "mlpclassifier__solver": ["sgd", "adam"]}, cv=3).fit(X, y)
    assert search.best_score_ > 0.9
    assert cross_val_score(pipe, X, y, cv=3).mean() > 0.9


def test_regressor_families_dtypes_and_determinism():
    X, y = make_regression(n_samples=300, n_features=5, noise=1.0, random_state=0)
    y = y / y.std()
    for dtype in ("float32", np.float32):
        reg = MLPRegressor(hidden_layer_sizes=(16,), dtype=dtype, learning_rate_init=0.01,
                           random_state=0).fit(X, y)
        assert reg.coefs_[0].dtype == np.float32 and reg.score(X, y) > 0.9
    counts = np.random.default_rng(0).poisson(np.exp(X[:, 0] / 2))
    poisson = MLPRegressor(family="poisson", learning_rate_init=0.01, random_state=0)
    assert poisson.fit(X, counts).predict(X).min() > 0
    with pytest.raises(ValueError, match="non-negative"):
        poisson.fit(X, -counts)
    a, b = (MLPRegressor(hidden_layer_sizes=(8,), max_iter=5, deterministic=True, chunk_size=16,
                         random_state=3).fit(X, y) for _ in range(2))
    assert np.array_equal(a.predict(X), b.predict(X))


def test_random_state_none_draws_a_seed_and_an_int_is_the_seed():
    X, y = digits()
    a, b = (MLPClassifier(hidden_layer_sizes=(4,), max_iter=1).fit(X, y) for _ in range(2))
    assert not np.array_equal(a.coefs_[0], b.coefs_[0])
    a, b = (MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, random_state=7).fit(X, y)
            for _ in range(2))
    assert np.array_equal(a.coefs_[0], b.coefs_[0])


def test_feature_names_of_a_data_frame_are_kept_and_saved(tmp_path):
    pd = pytest.importorskip("pandas")
    X, y = digits()
    frame = pd.DataFrame(X, columns=[f"px{i}" for i in range(64)])
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0).fit(frame, y)
    assert list(clf.feature_names_in_) == list(frame.columns)
    save_model(clf, tmp_path / "m.npz")
    assert load_model(tmp_path / "m.npz").meta["features"] == list(frame.columns)


def test_an_estimators_model_file_is_the_command_lines(tmp_path):
    X, y = load_breast_cancer(return_X_y=True)
    labels = np.array(["benign", "malignant"])[y]
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0).fit(X, labels)
    save_model(clf, tmp_path / "model.npz")
    model = load_model(tmp_path / "model.npz")
    assert np.array_equal(model.predict(X), clf.predict(X))
    assert np.array_equal(model.predict_proba(X), clf.predict_proba(X))
    assert model.score(X, labels) == clf.score(X, labels)
    np.savez(tmp_path / "data.npz", X=X, y=labels)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "distnn", "predict", "model.npz", "data.npz",
                          "--target", "y", "-o", "pred.csv"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert rows[0] == "p_malignant,label" and len(rows) == len(X) + 1
    assert [r.split(",")[1] for r in rows[1:]] == clf.predict(X).tolist()  # the labels
    evaluate = subprocess.run([sys.executable, "-m", "distnn", "evaluate", "model.npz",
                               "data.npz", "--target", "y", "--json"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert evaluate.returncode == 0, evaluate.stderr


def test_importing_distnn_or_its_estimators_starts_no_mpi():
    code = ("import sys, distnn; distnn.MLPClassifier; distnn.load_model; "
            "print('mpi4py' in sys.modules, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["False", "True"]
    code = "import sys, distnn; print('sklearn' in sys.modules or 'mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["False"]


MPIEXEC = next((str(p) for p in (Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec"))
                if p and os.access(p, os.X_OK)), None)


def test_the_quickstart_example_runs_unchanged_with_python_and_mpiexec(tmp_path):
    """The README's example: the same script and the same held-out accuracy on 1 and 2 ranks."""
    if MPIEXEC is None:
        pytest.skip("no mpiexec beside python or on PATH")
    outputs = []
    for launch in ([], [MPIEXEC, "-n", "2"]):
        run = subprocess.run([*launch, sys.executable, str(REPO / "examples" /
                                                            "sklearn_quickstart.py"), "m.npz"],
                             cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
        assert load_model(tmp_path / "m.npz").net.sizes == [64, 64, 10]
    assert outputs[0].startswith("held-out accuracy") and "on 1 rank(s)" in outputs[0]
    assert outputs[1] == outputs[0].replace("on 1 rank", "on 2 rank")  # printed once, alike
