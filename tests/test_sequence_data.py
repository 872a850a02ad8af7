"""Specification of the edges of recurrent networks (issue 18): the config's recurrent keys, sequence
data sources (.npz X (N, T, d) with lengths, synthetic:sequence, data.steps) and their refusals,
standardization over the steps that exist, labels per step."""
import numpy as np
import pytest

from distnn import config, data
from distnn.config import ConfigError, parse_config, to_toml
from distnn.sources import DataError, load

SOURCE = {"data": {"source": "seq.npz"}}


def recurrent(**model):
    return {"model": {"kind": "recurrent", "state": 4} | model} | SOURCE


# ----------------------------------------------------------------------------------- config

def test_recurrent_keys_parse_with_their_types_and_round_trip(tmp_path):
    d = recurrent(state=16, state_activation="relu", targets="every", hidden=[8])
    d["train"] = {"bptt": 5}
    d["data"] = {"source": "sklearn:digits", "steps": 8}
    cfg = parse_config(d)
    m = cfg.model
    assert (m.kind, m.state, m.state_activation, m.targets) == ("recurrent", 16, "relu", "every")
    assert (cfg.train.bptt, cfg.data.steps) == (5, 8)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert config.load_config(path) == cfg


def test_a_dense_config_keeps_its_defaults():
    cfg = parse_config(SOURCE)
    assert (cfg.model.kind, cfg.model.state, cfg.model.targets, cfg.train.bptt, cfg.data.steps) == (
        "dense", 0, "last", 0, 0)


@pytest.mark.parametrize("d, message", [
    (recurrent(state=0), "model.state: expected >= 1 with model.kind = 'recurrent', got 0"),
    (recurrent(kind="lstm"), "model.kind: expected one of ['dense', 'recurrent'], got 'lstm'"),
    (recurrent(targets="all"), "model.targets: expected one of ['last', 'every'], got 'all'"),
    (recurrent(state_activation="tahn"), "model.state_activation: expected one of"),
    (recurrent(state=2.5), "model.state: expected an integer, got 2.5"),
    (recurrent(state=-1), "model.state: expected a finite value >= 0, got -1"),
    (recurrent() | {"train": {"bptt": -2}}, "train.bptt: expected a finite value >= 0, got -2"),
    (recurrent() | {"data": {"source": "x.csv", "steps": -1}}, "data.steps: expected a finite"),
    ({"model": {"state": 8}} | SOURCE,
     "model.state: only a recurrent model reads it (got 8); set model.kind = \"recurrent\""),
    ({"model": {"targets": "every"}} | SOURCE, "model.targets: only a recurrent model reads it"),
    ({"model": {"state_activation": "relu"}} | SOURCE, "model.state_activation: only a recurrent"),
    ({"train": {"bptt": 4}} | SOURCE, "train.bptt: only a recurrent model reads it"),
    ({"data": {"source": "x.csv", "steps": 8}}, "data.steps: only a recurrent model reads it"),
    (recurrent(state_size=8), "model.state_size: unknown key; did you mean model.state?"),
    (recurrent(cell="lstm"), "model.cell: unknown key; distnn's recurrent model is a dense network "
                             "applied through time"),
    (recurrent() | {"train": {"truncate": 8}}, "train.truncate: unknown key; did you mean train.bptt?"),
])
def test_every_recurrent_error_names_its_key(d, message):
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- npz sequences

def sequences(n=12, t=5, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, t, d))
    lengths = rng.integers(1, t + 1, n)
    return X, rng.integers(0, 3, n), lengths


def test_npz_sequences_load_memory_mapped_with_their_lengths(tmp_path):
    X, y, lengths = sequences()
    np.savez(tmp_path / "s.npz", X=X, y=y, lengths=lengths)
    ds = load(str(tmp_path / "s.npz"))
    assert isinstance(ds.X, np.memmap) and ds.X.shape == (12, 5, 3)
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.lengths, lengths)
    assert ds.feature_names == ["x0", "x1", "x2"] and ds.n_features == 3


def test_npz_sequences_without_lengths_have_all_steps(tmp_path):
    X, y, _ = sequences()
    np.savez(tmp_path / "s.npz", X=X, y=y)
    assert load(str(tmp_path / "s.npz")).lengths is None


@pytest.mark.parametrize("change, message", [
    (lambda X, y, L: dict(lengths=L[:-1]), r"lengths has shape \(11,\); expected \(12,\)"),
    (lambda X, y, L: dict(lengths=L.astype(float)),
     "lengths has dtype float64; expected integers"),
    (lambda X, y, L: dict(lengths=np.where(np.arange(12) == 7, 0, L)),
     r"lengths row 7 is 0; expected 1\.\.5 \(X has 5 steps\)"),
    (lambda X, y, L: dict(lengths=np.where(np.arange(12) == 3, 6, L)), "lengths row 3 is 6"),
    (lambda X, y, L: dict(X=X[:, 0], lengths=L), r"has 'lengths' but X has shape \(12, 3\)"),
    (lambda X, y, L: dict(X=X[..., None]), r"X must be 2-D .* or 3-D .*, got shape \(12, 5, 3, 1\)"),
    (lambda X, y, L: dict(X=X[:, :0]), r"expected at least one row and one step and one feature"),
    (lambda X, y, L: dict(y=y[:-1]), r"X has 12 rows but y has shape \(11,\)"),
    (lambda X, y, L: dict(y=np.zeros((12, 5, 2, 2))), r"y has shape \(12, 5, 2, 2\)"),
    (lambda X, y, L: dict(X=np.array([np.zeros((2, 3)), np.zeros((3, 3))], dtype=object)),
     "holds Python objects.*pad them to one array \\(N, T, d\\) and give their lengths"),
])
def test_bad_sequence_files_are_refused_in_one_line_naming_what_is_wrong(tmp_path, change,
                                                                          message):
    X, y, lengths = sequences()
    arrays = {"X": X, "y": y, "lengths": lengths} | change(X, y, lengths)
    if arrays["X"].dtype == object:
        arrays["y"] = y[:2]
        arrays.pop("lengths")
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(DataError, match=message) as e:
        load(str(tmp_path / "s.npz"))
    assert "\n" not in str(e.value)


def test_nan_is_refused_where_a_step_exists_and_ignored_in_padding():
    X, _, lengths = sequences()
    lengths[4] = 2
    X[4, 3, 1] = np.nan  # padding: nothing reads it
    data.scan(X, lengths=lengths)
    X[4, 1, 2] = np.inf
    with pytest.raises(DataError, match="X row 4, step 1, feature 2 is inf"):
        data.scan(X, lengths=lengths)
    with pytest.raises(DataError, match="X row 4, step 1, feature 2 is inf"):
        data.scan(X)  # without lengths every step exists


def test_the_fingerprint_of_sequences_holds_their_steps_and_lengths():
    X, y, lengths = sequences()
    ds = data.Dataset(X, y, ["a", "b", "c"], "y", "s.npz", lengths)
    first = data.fingerprint(ds, None, data.scan(X))
    assert (first["rows"], first["features"], first["steps"]) == (12, 3, 5)
    other = data.Dataset(X, y, ["a", "b", "c"], "y", "s.npz", np.maximum(lengths - 1, 1))
    assert data.fingerprint(other, None, data.scan(X))["crc32"] != first["crc32"]
    assert data.fingerprint_changes(first, data.fingerprint(ds, None, data.scan(X))) == []


# --------------------------------------------------------------------- synthetic and steps

def test_synthetic_sequences_are_deterministic_shaped_and_padded_with_zeros():
    a = load("synthetic:sequence?n=200&t=7&d=3&k=4&varlen=1&seed=2")
    b = load("synthetic:sequence?n=200&t=7&d=3&k=4&varlen=1&seed=2")
    assert a.X.shape == (200, 7, 3) and a.y.shape == (200,) and a.lengths.shape == (200,)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert a.lengths.min() >= 4 and a.lengths.max() == 7
    assert set(np.unique(a.y)) == {0, 1, 2, 3}
    gone = np.arange(7) >= a.lengths[:, None]
    assert gone.any() and (a.X[gone] == 0).all()
    assert load("synthetic:sequence?n=20").lengths is None  # varlen=0: every step exists


@pytest.mark.parametrize("source, message", [
    ("synthetic:sequence?t=0", "parameter 't' expected >= 1"),
    ("synthetic:sequence?k=1", "parameter 'k' expected >= 2"),
    ("synthetic:sequence?varlen=2", "parameter 'varlen' expected 0 or 1, got 2"),
    ("synthetic:sequence?steps=3", "unknown parameter 'steps'"),
    ("synthetic:sequence?n=100000000000&t=100000&d=10", "n=100000000000 rows of t=100000 steps of "
                                                        "d=10 features need"),
])
def test_synthetic_sequence_errors(source, message):
    with pytest.raises(DataError, match=message):
        load(source)


def test_steps_read_each_digit_as_its_eight_rows():
    flat = load("sklearn:digits")
    rows = load("sklearn:digits", steps=8)
    assert rows.X.shape == (1797, 8, 8) and rows.n_features == 8
    images = flat.X.reshape(-1, 8, 8)  # scikit-learn's images, row by row
    np.testing.assert_array_equal(rows.X, images)
    with pytest.raises(DataError, match="data.steps = 7 does not divide the 64 features"):
        load("sklearn:digits", steps=7)


def test_steps_refuse_data_that_is_already_sequences(tmp_path):
    X, y, _ = sequences()
    np.savez(tmp_path / "s.npz", X=X, y=y)
    with pytest.raises(DataError, match="set data.steps = 0 for sequence data"):
        load(str(tmp_path / "s.npz"), steps=5)


# ------------------------------------------------------------- standardization and labels

def test_standardization_counts_the_steps_that_exist_and_nothing_else():
    X, _, lengths = sequences(n=300, t=6, seed=1)
    X = 5.0 + 3.0 * X
    there = np.arange(6) < lengths[:, None]
    X[~there] = np.nan  # padding holds anything: were it read, the moments would be NaN
    rows = np.arange(40, 300)
    fit = data.Standardizer.fit(data.Steps(X, rows, lengths))
    steps = X[rows][there[rows]]  # (M, d): the steps of the training rows
    np.testing.assert_allclose(fit.mean, steps.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(fit.scale, steps.std(axis=0), rtol=1e-12)


def test_steps_are_the_rows_in_sequence_then_step_order():
    X = np.arange(3 * 4 * 2, dtype=float).reshape(3, 4, 2)
    steps = data.Steps(X, np.array([0, 2]), np.array([2, 4, 1]))
    assert steps.shape == (3, 2) and len(steps) == 3
    np.testing.assert_array_equal(steps[0:3], [X[0, 0], X[0, 1], X[2, 0]])


def test_labels_per_step_are_encoded_from_the_steps_that_exist():
    y = np.array([["cat", "dog", "??"], ["dog", "dog", "cat"]])
    codes, classes = data.encode_step_labels(y, np.array([2, 3]))
    assert classes.tolist() == ["cat", "dog"]  # "??" is padding: no class
    assert codes.tolist() == [[0, 1, 0], [1, 1, 0]]
    y = np.array([[1.0, np.nan], [2.0, 1.0]])
    assert data.zero_padding(y, np.array([1, 2])).tolist() == [[1.0, 0.0], [2.0, 1.0]]
