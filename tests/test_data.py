"""Specification of distnn.data and distnn.sources: sources, errors naming the place, splits, shards,
scaling."""
import sys

import numpy as np
import pytest

from distnn import data
from distnn.data import (SCALER_CHUNK, Standardizer, batches, check_finite, chunk_range, encode_labels,
                         epoch_permutation, fingerprint, scan, shard, train_val_split)
from distnn.exactsum import exact_sum_serial
from distnn.sources import DataError, load


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    return rng.standard_normal((50, 4)), rng.integers(0, 3, 50)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------- npz / npy

def test_npz_members_are_memory_mapped_and_round_trip(tmp_path, xy):
    X, y = xy
    path = str(tmp_path / "d.npz")
    np.savez(path, X=X, labels=y)
    ds = load(path, target="labels")
    assert isinstance(ds.X, np.memmap) and isinstance(ds.y, np.memmap)
    assert ds.X.filename == str(tmp_path / "d.npz") and not ds.X.flags.writeable
    np.testing.assert_array_equal(ds.X[[3, 7, 11]], X[[3, 7, 11]])
    np.testing.assert_array_equal(ds.y, y)
    assert ds.feature_names == ["x0", "x1", "x2", "x3"] and ds.target_name == "labels"


def test_npz_fortran_order_member_maps_correctly(tmp_path, xy):
    X, y = xy
    path = str(tmp_path / "f.npz")
    np.savez(path, X=np.asfortranarray(X), y=y)
    np.testing.assert_array_equal(load(path).X, X)


def test_compressed_npz_is_read_into_memory(tmp_path, xy):
    X, y = xy
    path = str(tmp_path / "c.npz")
    np.savez_compressed(path, X=X, y=y)
    ds = load(path)
    assert not isinstance(ds.X, np.memmap)
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.y, y)


def test_npz_missing_member_names_it(tmp_path, xy):
    path = str(tmp_path / "d.npz")
    np.savez(path, X=xy[0], y=xy[1])
    with pytest.raises(DataError, match=r"d\.npz has no array 'target' \(arrays: X, y\)"):
        load(path, target="target")


@pytest.mark.parametrize("ext", ["npz", "npy"])
def test_truncated_file_is_refused_naming_it(tmp_path, xy, ext):
    path = tmp_path / f"t.{ext}"
    (np.savez(path, X=xy[0], y=xy[1]) if ext == "npz" else np.save(path, xy[0]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if ext == "npy":
        np.save(tmp_path / "t_y.npy", xy[1])
    with pytest.raises(DataError, match=rf"t\.{ext}: truncated or corrupt"):
        load(str(path), target="t_y.npy")


def test_npy_pairs_x_with_sibling_target_file(tmp_path, xy):
    X, y = xy
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "X_y.npy", y)
    ds = load(str(tmp_path / "X.npy"), target="X_y.npy")  # relative to X's directory
    assert isinstance(ds.X, np.memmap)
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.y, y)
    with pytest.raises(DataError, match="holds X only"):
        load(str(tmp_path / "X.npy"))


def test_row_count_mismatch_is_refused(tmp_path, xy):
    path = str(tmp_path / "m.npz")
    np.savez(path, X=xy[0], y=xy[1][:-1])
    with pytest.raises(DataError, match="X has 50 rows but y has shape"):
        load(path)


def test_missing_file_and_unknown_extension():
    with pytest.raises(DataError, match="no such data file: nowhere.npz"):
        load("nowhere.npz")
    with pytest.raises(DataError, match="unknown data source"):
        load("data.parquet")


# ---------------------------------------------------------------------------------------- csv

def test_csv_round_trip_with_class_names_and_feature_subset(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,kind,c\n1,2,cat,3\n4, 5 ,dog,6\n\n7,8,cat,9\n")
    ds = load(path, target="kind")
    np.testing.assert_array_equal(ds.X, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert ds.feature_names == ["a", "b", "c"] and list(ds.y) == ["cat", "dog", "cat"]
    sub = load(path, target="kind", features=["c", "a"])
    np.testing.assert_array_equal(sub.X, [[3, 1], [6, 4], [9, 7]])


def test_csv_integral_targets_are_integers(tmp_path):
    ds = load(write(tmp_path, "d.csv", "x,y\n0.5,1\n1.5,0\n"), target="y")
    assert ds.y.dtype == np.int64 and list(ds.y) == [1, 0]
    ds = load(write(tmp_path, "r.csv", "x,y\n0.5,1.25\n1.5,0\n"), target="y")
    assert ds.y.dtype == np.float64


@pytest.mark.parametrize("text, target, message", [
    ("a,b,y\n1,2,0\n3,4\n", "y", r"d\.csv line 3: 2 fields, expected 3"),
    ("a,b,y\n1,2,0\n3,x4,1\n", "y", r"d\.csv line 3, column 'b': expected a number, got 'x4'"),
    ("a,b,y\n1,,0\n", "y", r"d\.csv line 2, column 'b': expected a number, got ''"),
    ("a,b,label\n1,2,0\n", "lable", r"no column 'lable'; did you mean 'label'\?"),
    ("a,b,y\n1,2,0\n", None, "needs the name of its target column"),
    ("", "y", r"d\.csv is empty"),
    ("a,b,y\n", "y", "header but no data rows"),
    ("a,a,y\n1,2,0\n", "y", "duplicate column names"),
    ("a,b,y\n1,2,\n", "y", r"line 2, column 'y': empty target"),
])
def test_csv_errors_name_line_and_column(tmp_path, text, target, message):
    with pytest.raises(DataError, match=message):
        load(write(tmp_path, "d.csv", text), target=target)


# numpy's str arrays drop trailing NULs, and float() takes \x1c-\x1f for whitespace: without a
# check of its own "2.0\x00" would be read as 2.0, and "cat\x00" would be the class "cat".
@pytest.mark.parametrize("text, where", [
    ("a,b,y\n1,2.0\x00,0\n", r"line 2, column 'b': control character '\\x00' in '2.0\\x00'"),
    ("a,b,y\n1,2,0\n\x00\x003,4,1\n", r"line 3, column 'a': control character '\\x00'"),
    ("a,b,y\n1,2,0\n3,4\x1c,1\n", r"line 3, column 'b': control character '\\x1c'"),
    ("a,b,y\n1,2,0\n3,4,1\x7f\n", r"line 3, column 'y': control character '\\x7f'"),
    ("a,b,y\n1,2,cat\x00\n3,4,dog\n", r"line 2, column 'y': control character '\\x00'"),
    ("a,b\x00,y\n1,2,0\n", r"line 1 \(the header\), column 2: control character '\\x00'"),
    ("a,b\x1f,y\n1,2,0\n", r"line 1 \(the header\), column 2: control character '\\x1f'"),
    ('a,b,y\n1,2,"x\ny"\n', r"line 3, column 'y': control character '\\n'"),
])
def test_csv_control_characters_are_refused_naming_line_and_column(tmp_path, text, where):
    with pytest.raises(DataError, match=r"d\.csv " + where):
        load(write(tmp_path, "d.csv", text), target="y")


def test_csv_cells_may_be_padded_with_spaces_and_tabs(tmp_path):
    ds = load(write(tmp_path, "d.csv", "a,b,y\n 1 ,\t2\t,0\n"), target="y")
    np.testing.assert_array_equal(ds.X, [[1, 2]])


def test_csv_unknown_feature_and_target_as_feature(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,y\n1,2,0\n")
    with pytest.raises(DataError, match="no column 'z'"):
        load(path, target="y", features=["z"])
    with pytest.raises(DataError, match="'y' is the target"):
        load(path, target="y", features=["a", "y"])


# ------------------------------------------------------------------------- sklearn, synthetic

def test_sklearn_digits():
    pytest.importorskip("sklearn")
    ds = load("sklearn:digits")
    assert ds.X.shape == (1797, 64) and ds.y.shape == (1797,)
    assert set(np.unique(ds.y)) == set(range(10)) and len(ds.feature_names) == 64


def test_sklearn_feature_selection_by_name():
    pytest.importorskip("sklearn")
    ds = load("sklearn:iris", features=["petal width (cm)"])
    assert ds.X.shape == (150, 1)


def test_sklearn_missing_tells_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    with pytest.raises(DataError, match=r"pip install 'distnn\[examples\]'"):
        load("sklearn:iris")


def test_unknown_sklearn_set():
    with pytest.raises(DataError, match="unknown data set 'sklearn:mnist'"):
        load("sklearn:mnist")


@pytest.mark.parametrize("kind, y_shape", [
    ("classification?n=300&d=7&k=5", (300,)), ("binary?n=300&d=7", (300,)),
    ("regression?n=300&d=7&k=2", (300, 2)), ("poisson?n=300&d=7", (300,)),
])
def test_synthetic_is_deterministic_and_shaped(kind, y_shape):
    a, b = load(f"synthetic:{kind}&seed=3"), load(f"synthetic:{kind}&seed=3")
    assert a.X.shape == (300, 7) and a.y.shape == y_shape
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.y, load(f"synthetic:{kind}&seed=4").y)


def test_synthetic_targets_fit_their_family():
    cls = load("synthetic:classification?n=2000&k=5").y
    assert cls.dtype == np.int64 and set(np.unique(cls)) == set(range(5))
    assert set(np.unique(load("synthetic:binary?n=500").y)) == {0, 1}
    counts = load("synthetic:poisson?n=2000").y
    assert counts.dtype == np.int64 and counts.min() >= 0 and counts.max() > 1


@pytest.mark.parametrize("source, message", [
    ("synthetic:images", "unknown kind 'images'"),
    ("synthetic:binary?k=3", "unknown parameter 'k'"),
    ("synthetic:regression?n=ten", "parameter 'n' expected an integer, got 'ten'"),
    ("synthetic:classification?k=1", "parameter 'k' expected >= 2"),
    ("synthetic:regression?noise=-1", "parameter 'noise' expected >= 0.0"),
    ("synthetic:classification?k=65537", "parameter 'k' expected <= 65536, got 65537"),
    ("synthetic:regression?k=1000000000000", "parameter 'k' expected <= 65536"),
    ("synthetic:binary?n=1000000000000&d=1000000000000",
     "n=1000000000000 rows of d=1000000000000 features need 7,450,580,596,923,828.0 GiB"),
])
def test_synthetic_errors(source, message):
    with pytest.raises(DataError, match=message):
        load(source)


# -------------------------------------------------------------------------- finite, labels

def test_check_finite_names_first_bad_row_and_column():
    X = np.ones((10, 4))
    X[7, 1], X[3, 2] = np.inf, np.nan
    with pytest.raises(DataError, match=r"^X row 3, column 2 is NaN$"):
        check_finite(X, block=2)  # the bad rows lie in different blocks
    with pytest.raises(DataError, match=r"^X row 7, column 1 is inf$"):
        check_finite(X, rows=np.array([0, 7, 8]), block=2)
    check_finite(X, rows=np.array([0, 1, 9]))  # rows not read are not checked
    with pytest.raises(DataError, match=r"^y row 4 is -inf$"):
        check_finite(np.array([0, 1, 2, 3, -np.inf]), name="y")


def test_check_finite_streams_a_memmap(tmp_path):
    X = np.zeros((100, 3), dtype=np.float32)
    X[99, 0] = np.nan
    np.save(tmp_path / "X.npy", X)
    with pytest.raises(DataError, match="X row 99, column 0 is NaN"):
        check_finite(np.load(tmp_path / "X.npy", mmap_mode="r"), block=16)


def test_encode_labels_inverts_to_the_labels():
    y = np.array(["b", "a", "c", "a"])
    codes, classes = encode_labels(y)
    assert codes.dtype == np.int64 and list(classes) == ["a", "b", "c"]
    np.testing.assert_array_equal(classes[codes], y)
    codes, classes = encode_labels(np.array([[7], [3], [7]]))
    assert list(codes) == [1, 0, 1] and list(classes) == [3, 7]


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_a_non_finite_float_is_no_class_label(bad, what):
    with pytest.raises(DataError, match=rf"^d.npz: target 'y' row 2 is {what}; class labels must"):
        encode_labels(np.array([0.0, 1.0, bad, 1.0]), name="d.npz: target 'y'")


def test_scan_checksums_the_same_blocks_at_any_rank_count(monkeypatch):
    import distnn.data

    monkeypatch.setattr(distnn.data, "BLOCK_BYTES", 10 * 4 * 8)  # blocks of 10 rows
    X = np.random.default_rng(0).standard_normal((95, 4))
    one = scan(X)
    assert one.shape == (10,) and np.all(one != 0)
    for size in (2, 3, 16):
        assert np.array_equal(sum(scan(X, rank, size) for rank in range(size)), one)
    X[93, 1] = np.nan
    with pytest.raises(DataError, match=r"^X row 93, column 1 is NaN$"):
        scan(X, 2, 3)


def test_the_fingerprint_changes_with_any_value():
    ds = load("synthetic:classification?n=50")
    before = fingerprint(ds, np.arange(3), scan(ds.X))
    assert before["rows"] == 50 and before["features"] == 10 and before["classes"] == [0, 1, 2]
    ds.X[17, 3] += 1e-12
    assert fingerprint(ds, np.arange(3), scan(ds.X))["crc32"] != before["crc32"]
    ds.X[17, 3] -= 1e-12
    ds.y[4] = (ds.y[4] + 1) % 3
    assert fingerprint(ds, np.arange(3), scan(ds.X))["crc32"] != before["crc32"]


# ----------------------------------------------------------------- split, order, shards

def test_train_val_split_partitions_reproducibly():
    tr, va = train_val_split(101, 0.2, seed=5)
    assert len(va) == 20 and len(tr) == 81
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(101))
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    np.testing.assert_array_equal(train_val_split(101, 0.2, seed=5)[1], va)
    assert not np.array_equal(train_val_split(101, 0.2, seed=6)[1], va)
    assert len(train_val_split(10, 0.0, 0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(10, 1.0, 0)


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    p = epoch_permutation(7, 3, 1000)
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, epoch_permutation(7, 3, 1000))
    assert not np.array_equal(p, epoch_permutation(7, 4, 1000))
    assert not np.array_equal(p, epoch_permutation(8, 3, 1000))


def test_batches_cover_the_epoch():
    assert batches(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batches(8, 4) == [(0, 4), (4, 8)] and batches(0, 4) == []


@pytest.mark.parametrize("split", [
    lambda start, stop, size, rank: shard(start, stop, size, rank),
    lambda start, stop, size, rank: tuple(start + v for v in chunk_range(stop - start, size, rank)),
])
def test_shards_tile_the_range_and_differ_by_at_most_one(split):
    for start in (0, 13):
        for n in range(0, 30):
            for size in range(1, 8):
                parts = [split(start, start + n, size, r) for r in range(size)]
                assert parts[0][0] == start and parts[-1][1] == start + n
                assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
                lengths = [hi - lo for lo, hi in parts]
                assert max(lengths) - min(lengths) <= 1
                assert lengths == sorted(lengths, reverse=True)  # earlier ranks take the extra
    assert [shard(0, 2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="rank 4"):
        shard(0, 10, 4, 4)


# ------------------------------------------------------------------------- standardization

def test_standardizer_matches_numpy_on_the_rows():
    rng = np.random.default_rng(1)
    X = rng.normal(5.0, 3.0, (200, 3))
    X[:, 1] = 2.5  # a constant feature is scaled by 1, not divided by zero
    rows = np.arange(0, 200, 3)
    st = Standardizer.fit(X, rows)
    np.testing.assert_allclose(st.mean, X[rows].mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(st.scale[[0, 2]], X[rows][:, [0, 2]].std(axis=0), rtol=1e-12)
    assert st.scale[1] == 1.0
    Z = st.transform(X[rows])
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[:, [0, 2]].std(axis=0), 1, rtol=1e-12)


def test_moments_of_row_blocks_add_up_to_the_whole():
    X = np.random.default_rng(2).standard_normal((97, 5))
    shift = X[0]
    parts = [Standardizer.moments(X, np.arange(lo, hi), shift=shift)
             for lo, hi in (shard(0, 97, 4, r) for r in range(4))]  # as 4 ranks would
    whole = Standardizer.moments(X, block=10)
    np.testing.assert_allclose(sum(parts), whole, rtol=1e-12)
    a = Standardizer.from_moments(whole[0], whole[1:6], whole[6:], shift)
    b = Standardizer.fit(X)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-12)


def fit_on_ranks(X, rows, size):
    """Standardizer.fit on `size` simulated ranks: each hands its chunk moments to the exact sum,
    which adds every rank's, as Comm.exact_sum does (it equals the serial sum in bits for any split:
    test_comm_mpi)."""
    handed = []
    for rank in range(size):
        Standardizer.fit(X, rows, rank=rank, size=size,
                         exact_sum=lambda m, n: handed.append((m.copy(), n)) or np.ones(m.shape[1]))
    assert len({n for _, n in handed}) == 1  # every rank names the same chunk count
    total = exact_sum_serial(np.concatenate([m for m, _ in handed]))
    d = X.shape[1]
    return Standardizer.from_moments(total[0], total[1:d + 1], total[d + 1:], np.asarray(X[0], float))


def test_one_fit_is_the_float64_mean_and_std_with_the_same_bits_on_any_rank_count():
    rng = np.random.default_rng(5)
    X = rng.normal(50.0, 4.0, (3 * SCALER_CHUNK + 123, 3)) * [1, 1e-6, 1e6]
    rows = np.flatnonzero(rng.random(len(X)) < 0.9)  # 4 chunks: 3 ranks own 2, 1 and 1
    one = Standardizer.fit(X, rows)
    np.testing.assert_allclose(one.mean, X[rows].mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(one.scale, X[rows].std(axis=0), rtol=1e-12)
    for size in (1, 2, 3):
        split = fit_on_ranks(X, rows, size)
        assert split.mean.tobytes() == one.mean.tobytes()
        assert split.scale.tobytes() == one.scale.tobytes()


def test_a_fit_on_several_ranks_needs_their_sum_and_overflow_is_a_data_error():
    X = np.ones((10, 2))
    with pytest.raises(ValueError, match="a fit on 2 ranks needs their exact_sum"):
        Standardizer.fit(X, rank=0, size=2)
    X[3, 1] = 1e200  # its square overflows
    with pytest.raises(DataError, match=r"too large to standardize .* data.standardize = false"):
        Standardizer.fit(X)


def test_loading_names_are_reexported_by_data():
    assert data.load is load and data.DataError is DataError


def test_shifted_moments_survive_a_large_offset():
    # naive sumsq/n - mean^2 loses every digit here: mean^2 ~ 1e18, var ~ 1e-2
    X = 1e9 + np.random.default_rng(3).normal(0, 0.1, (1000, 2))
    st = Standardizer.fit(X)
    np.testing.assert_allclose(st.scale, X.std(axis=0), rtol=1e-6)


def test_transform_keeps_float_dtype_and_round_trips_through_arrays():
    X = np.random.default_rng(4).standard_normal((20, 3)).astype(np.float32)
    st = Standardizer.fit(X)
    assert st.transform(X).dtype == np.float32
    ints = np.arange(6).reshape(3, 2)
    assert Standardizer.fit(ints).transform(ints).dtype == np.float64
    out = np.empty_like(X)
    assert st.transform(X, out=out) is out
    back = Standardizer.from_arrays(st.to_arrays())
    np.testing.assert_array_equal(back.mean, st.mean)
    np.testing.assert_array_equal(back.scale, st.scale)
