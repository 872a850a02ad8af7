"""Data sources: a source string to a Dataset of features, targets and names (`load`).

  "path.npz"            arrays "X" and "y" (or `target`); uncompressed members are memory-mapped;
                        sequences: X (N, T, d) and, for variable lengths, "lengths" (N,) in 1..T
  "path.npy"            X only, memory-mapped; y from the file named by `target` ("path_y.npy")
  "path.csv"            header row, numeric features, `target` names the target column
  "sklearn:NAME"        digits, breast_cancer, diabetes, iris, wine (pip install distnn[examples])
  "synthetic:KIND?n=..&d=..&seed=.."   classification, binary, regression, poisson (deterministic);
                        sequence?n=..&t=..&d=..&k=..&varlen=0|1: (N, T, d) sequences, k classes

A 2-D source is read as sequences with `steps` (data.steps): each row of d features is `steps`
steps of d / steps features, in order (sklearn:digits with steps=8: 8 rows of 8 pixels).

Every error is a DataError naming the file, row or column and what was expected.
"""
from __future__ import annotations

import csv
import difflib
import math
import os
import re
import struct
import sys
import urllib.parse
import zipfile
from dataclasses import dataclass

import numpy as np
import numpy.lib.format as npformat

from .synthetic import SYNTHETIC


class DataError(ValueError):
    """Bad data input; the message names the file, row or column and what was expected."""


@dataclass
class Dataset:
    """Features, targets and names of one data source (X may be a read-only np.memmap)."""

    X: np.ndarray              # (N, d), or (N, T, d) sequences
    y: np.ndarray              # (N,) or (N, K), labels as stored (ints, floats or strings);
                               # sequences with a target per step: (N, T) or (N, T, K)
    feature_names: list[str]
    target_name: str
    source: str
    lengths: np.ndarray | None = None  # sequences of variable length: (N,) integers in 1..T

    @property
    def n_features(self) -> int:
        """Features of a row, or of a step of a sequence."""
        return self.X.shape[-1]


# ---------------------------------------------------------------------------------------- loading

def load(source: str, *, target: str | None = None, features: list[str] | None = None,
         require_target: bool = True, steps: int = 0) -> Dataset:
    """Load a data source (see the module docstring); `features` selects columns by name; `steps`
    reads each row as that many steps of a sequence.

    With require_target=False (data to predict on) a file without the target gives y = None."""
    kind, _, rest = source.partition(":")
    if kind == "sklearn":
        ds = _load_sklearn(rest)
    elif kind == "synthetic":
        ds = _load_synthetic(source, rest)
    else:
        ds = _load_file(source, target, features, require_target)
    if features and ds.feature_names != list(features):  # CSV selects while parsing
        ds = _select_features(ds, features)
    if steps:
        ds = as_steps(ds, steps)
    _check_shapes(ds)
    return ds


def _load_file(path: str, target: str | None, features: list[str] | None,
               require_target: bool = True) -> Dataset:
    """Dispatch on the file extension after checking the file exists."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npz", ".npy", ".csv"):
        raise DataError(f"{path}: unknown data source; expected a .npz, .npy or .csv file, "
                        f"'sklearn:NAME' or 'synthetic:KIND'")
    if not os.path.isfile(path):
        raise DataError(f"no such data file: {path}")
    if ext == ".csv":
        return _load_csv(path, target, features, require_target)
    if ext == ".npz":
        return _load_npz(path, target, require_target)
    return _load_npy(path, target, require_target)


def _load_npz(path: str, target: str | None, require_target: bool = True) -> Dataset:
    """Arrays "X" and `target` (default "y") from an .npz, memory-mapping uncompressed members."""
    ykey = target or "y"
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            for key in ("X", ykey) if require_target else ("X",):
                if key not in names:
                    have = ", ".join(names) or "none"
                    raise DataError(f"{path} has no array '{key}' (arrays: {have})")
            X = _npz_member(path, zf, "X")
            y = _npz_member(path, zf, ykey) if ykey in names else None
            lengths = _npz_member(path, zf, LENGTHS) if LENGTHS in names else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: truncated or corrupt .npz ({e})") from None
    return Dataset(X, y, _default_names(X), ykey, path, lengths)


LENGTHS = "lengths"  # the .npz array of sequence lengths


def _npz_member(path: str, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """One .npz member: an np.memmap when stored uncompressed, else read whole into memory.

    np.load(mmap_mode=...) ignores mmap_mode for .npz, so we find where the member's .npy data
    starts inside the zip (local header + name + extra field + .npy header) and map it there.
    A compressed member (np.savez_compressed) cannot be mapped: it costs its full size in memory.
    """
    info = zf.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(info) as f:
            return _read_npy(f, f"{path}[{key}]")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # fixed part of the zip local file header
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise DataError(f"{path}: corrupt .npz (bad zip header for '{key}')")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        header = _npy_header(f, f"{path}[{key}]")
        if header is None:  # a header version without a public reader: read the member whole
            with zf.open(info) as g:
                return _read_npy(g, f"{path}[{key}]")
        shape, fortran, dtype = header
        offset = f.tell()
    nbytes = math.prod(shape) * dtype.itemsize
    if offset - start + nbytes > info.file_size:
        raise DataError(f"{path}: truncated or corrupt .npz (array '{key}' is cut short)")
    if nbytes == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")


def _npy_header(f, name: str):
    """(shape, fortran_order, dtype) of the .npy at f's position, or None for format 3.0."""
    try:
        version = npformat.read_magic(f)
        reader = {(1, 0): npformat.read_array_header_1_0,
                  (2, 0): npformat.read_array_header_2_0}.get(version)
        if reader is None:
            return None
        shape, fortran, dtype = reader(f)
    except Exception as e:  # numpy's header parser raises SyntaxError, TokenError, ...
        raise DataError(f"{name}: corrupt .npy header ({e})") from None
    if dtype.hasobject:
        raise DataError(f"{name}: holds Python objects; only numeric or string arrays are loaded "
                        f"(sequences of different lengths: pad them to one array (N, T, d) and "
                        f"give their lengths as the array '{LENGTHS}')")
    return shape, fortran, dtype


def _read_npy(f, name: str) -> np.ndarray:
    """Read a whole .npy stream without pickle."""
    try:
        return npformat.read_array(f, allow_pickle=False)
    except Exception as e:  # numpy's header parser raises SyntaxError, TokenError, ...
        raise DataError(f"{name}: truncated or corrupt .npy ({e})") from None


def _load_npy(path: str, target: str | None, require_target: bool = True) -> Dataset:
    """X from `path` (memory-mapped); y from the .npy named by `target`.

    `target` is taken as given when that file exists, else relative to X's directory, so
    source="data/X.npy", target="X_y.npy" finds data/X_y.npy.
    """
    if not require_target and not (target and _sibling(path, target)):
        X = _mmap_npy(path)
        return Dataset(X, None, _default_names(X), "", path)
    if not target:
        stem = os.path.splitext(os.path.basename(path))[0]
        raise DataError(f"{path}: a .npy source holds X only; name the targets file as the target "
                        f"(e.g. '{stem}_y.npy')")
    ypath = _sibling(path, target)
    if ypath is None:
        raise DataError(f"no such data file: {target} (targets for {path})")
    X, y = _mmap_npy(path), _mmap_npy(ypath)
    return Dataset(X, y, _default_names(X), os.path.splitext(os.path.basename(ypath))[0], path)


def _sibling(path: str, target: str) -> str | None:
    """The targets file: `target` as given when it exists, else beside X's file; None if neither."""
    for candidate in (target, os.path.join(os.path.dirname(path), target)):
        if os.path.isfile(candidate):
            return candidate
    return None


def _mmap_npy(path: str) -> np.ndarray:
    """np.load with mmap_mode="r" and no pickle; errors name the file."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy's header parser raises SyntaxError, TokenError, ...
        raise DataError(f"{path}: truncated or corrupt .npy ({e})") from None


def _load_csv(path: str, target: str | None, features: list[str] | None,
              require_target: bool = True) -> Dataset:
    """Header row, numeric feature columns, a target column of numbers or class names."""
    if not target and require_target:
        raise DataError(f"{path}: a CSV source needs the name of its target column (data.target)")
    header, body, lines = _read_csv(path)
    col = {name: j for j, name in enumerate(header)}
    if require_target:
        _require_columns(path, [target], col)
    names = list(features) if features else [h for h in header if h != target]
    _require_columns(path, names, col)
    if target in names:
        raise DataError(f"{path}: column '{target}' is the target and cannot also be a feature")
    X = _numeric_columns(path, body, lines, [col[n] for n in names], names)
    # data to predict on: a target column, if there, is not read (it may well be empty)
    y = _target_column(path, body, lines, col[target], target) if require_target else None
    return Dataset(X, y, names, target or "", path)


def _read_csv(path: str) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, data rows, file line of each row); ragged, empty or header-only files raise."""
    body, lines = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty (expected a header row)")
            _refuse_control(path, header, "line 1 (the header), column {}",
                            [str(j + 1) for j in range(len(header))])
            header = [h.strip() for h in header]
            for fields in reader:
                if not fields:  # blank line
                    continue
                if len(fields) != len(header):
                    raise DataError(f"{path} line {reader.line_num}: {len(fields)} fields, "
                                    f"expected {len(header)} as in the header")
                _refuse_control(path, fields, f"line {reader.line_num}, column '{{}}'", header)
                body.append(fields)
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not body:
        raise DataError(f"{path} has a header but no data rows")
    dup = {h for h in header if header.count(h) > 1}
    if dup:
        raise DataError(f"{path}: duplicate column names in the header: {', '.join(sorted(dup))}")
    return header, body, lines


# C0 controls but tab, and DEL: no number or label holds one, and neither may pass unseen: numpy's
# str arrays drop trailing NULs ("2.0\x00" would read as 2.0, "cat\x00" as the class "cat") and
# float() takes \x1c-\x1f for whitespace. Tabs pad cells as spaces do.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _refuse_control(path: str, cells: list[str], where: str, names: list[str]) -> None:
    """DataError naming the line and column of the first cell with a control character;
    `where` is formatted with the column's name. One regex scan per row when there is none."""
    if not _CONTROL.search("".join(cells)):
        return
    j, found = next((j, m) for j, c in enumerate(cells) if (m := _CONTROL.search(c)))
    raise DataError(f"{path} {where.format(names[j])}: control character {found[0]!r} in "
                    f"{cells[j]!r}")


def _require_columns(path: str, wanted: list[str], col: dict[str, int]) -> None:
    """Every name in `wanted` is a column, else a DataError suggesting the closest one."""
    for name in wanted:
        if name not in col:
            close = difflib.get_close_matches(name, list(col), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (columns: {', '.join(col)})"
            raise DataError(f"{path}: no column '{name}'{hint}")


def _numeric_columns(path, body, lines, idx, names) -> np.ndarray:
    """(N, len(idx)) float64 from the selected columns; the first non-number is named."""
    cells = np.array([[row[j] for j in idx] for row in body], dtype=str)
    cells = cells.reshape(len(body), len(idx))  # (N, 0) when no feature columns
    try:
        return np.char.strip(cells).astype(np.float64)
    except ValueError:
        pass
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            try:
                float(cell)
            except ValueError:
                raise DataError(f"{path} line {lines[i]}, column '{names[j]}': expected a number, "
                                f"got {str(cell)!r}") from None
    raise DataError(f"{path}: feature columns are not all numbers")


def _target_column(path, body, lines, j, name) -> np.ndarray:
    """Targets as int64 (integral numbers), float64 (other numbers) or str (class names)."""
    values = [row[j].strip() for row in body]
    for i, v in enumerate(values):
        if v == "":
            raise DataError(f"{path} line {lines[i]}, column '{name}': empty target")
    try:
        y = np.array([float(v) for v in values])
    except ValueError:
        return np.array(values)
    integral = np.isfinite(y).all() and (y == np.round(y)).all() and np.abs(y).max() < 2**53
    return y.astype(np.int64) if integral else y


def _select_features(ds: Dataset, features: list[str]) -> Dataset:
    """Keep the named feature columns (in-memory sources only; a memmap would be copied whole)."""
    if isinstance(ds.X, np.memmap):
        raise DataError(f"{ds.source}: selecting features is supported for CSV, sklearn and "
                        f"synthetic sources; a memory-mapped X would be copied whole")
    _require_columns(ds.source, features, {n: j for j, n in enumerate(ds.feature_names)})
    idx = [ds.feature_names.index(n) for n in features]
    return Dataset(ds.X[..., idx], ds.y, list(features), ds.target_name, ds.source, ds.lengths)


def _check_shapes(ds: Dataset) -> None:
    """X is a non-empty 2-D numeric array, or 3-D (sequences), and y has one entry per row."""
    src = ds.source
    if ds.X.ndim not in (2, 3):
        raise DataError(f"{src}: X must be 2-D (samples, features) or 3-D (sequences, steps, "
                        f"features), got shape {ds.X.shape}")
    if ds.X.dtype.kind not in "biuf":
        raise DataError(f"{src}: X has dtype {ds.X.dtype}, expected numbers")
    if 0 in ds.X.shape:
        what = "one feature" if ds.X.ndim == 2 else "one step and one feature"
        raise DataError(f"{src}: X has shape {ds.X.shape}; expected at least one row and {what}")
    n, top = ds.X.shape[0], ds.X.ndim  # y: (N,) (N, K); sequences also (N, T) (N, T, K)
    if ds.y is not None and (not 1 <= ds.y.ndim <= top or ds.y.shape[0] != n):
        shapes = f"({n},) or ({n}, K)" + (f", ({n}, T) or ({n}, T, K)" if top == 3 else "")
        raise DataError(f"{src}: X has {n} rows but y has shape {ds.y.shape}; expected {shapes}")
    if ds.lengths is not None:
        _check_lengths(src, ds.lengths, ds.X.shape)


def _check_lengths(src: str, lengths: np.ndarray, shape: tuple) -> None:
    """Sequence lengths: (N,) integers in 1..T, for 3-D X only; the first bad row is named."""
    if len(shape) != 3:
        raise DataError(f"{src}: has '{LENGTHS}' but X has shape {shape}; lengths go with "
                        f"sequences, X (N, T, d)")
    n, steps = shape[:2]
    if lengths.shape != (n,):
        raise DataError(f"{src}: {LENGTHS} has shape {lengths.shape}; expected ({n},), one per "
                        f"sequence")
    if lengths.dtype.kind not in "iu":
        raise DataError(f"{src}: {LENGTHS} has dtype {lengths.dtype}; expected integers "
                        f"(steps per sequence, 1..{steps})")
    bad = np.flatnonzero((lengths < 1) | (lengths > steps))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{src}: {LENGTHS} row {i} is {int(lengths[i])}; expected 1..{steps} "
                        f"(X has {steps} steps)")


def as_steps(ds: Dataset, steps: int) -> Dataset:
    """A 2-D source read as sequences: each row of d features as `steps` steps of d / steps
    features, in order ((N, d) -> (N, steps, d / steps), a view of a C-ordered array)."""
    if ds.X.ndim != 2:
        raise DataError(f"{ds.source}: data.steps = {steps} reads each row of a 2-D X as steps, "
                        f"but X has shape {ds.X.shape}; set data.steps = 0 for sequence data")
    d = ds.X.shape[1]
    if d % steps:
        raise DataError(f"{ds.source}: data.steps = {steps} does not divide the {d} features "
                        f"into steps of equal size")
    X = ds.X.reshape(len(ds.X), steps, d // steps)
    return Dataset(X, ds.y, _default_names(X), ds.target_name, ds.source, ds.lengths)


def _default_names(X: np.ndarray) -> list[str]:
    """x0, x1, ... for sources without column names (a step's features, for sequences)."""
    return [f"x{j}" for j in range(X.shape[-1] if X.ndim in (2, 3) else 0)]


# ---------------------------------------------------------------------- bundled and synthetic

SKLEARN_SETS = ("digits", "breast_cancer", "diabetes", "iris", "wine")


def _load_sklearn(name: str) -> Dataset:
    """One of scikit-learn's bundled data sets, by name."""
    if name not in SKLEARN_SETS:
        raise DataError(f"unknown data set 'sklearn:{name}'; expected one of {list(SKLEARN_SETS)}")
    try:
        from sklearn import datasets
    except ImportError:
        raise DataError(f"'sklearn:{name}' needs scikit-learn: "
                        f"pip install 'distnn[examples]'") from None
    bunch = getattr(datasets, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=np.float64)
    names = [str(n) for n in getattr(bunch, "feature_names", _default_names(X))]
    return Dataset(X, np.asarray(bunch.target), names, "target", f"sklearn:{name}")


def _load_synthetic(source: str, spec: str) -> Dataset:
    """Deterministic generated data: "KIND?n=1000&d=10&seed=0" (parameters per SYNTHETIC)."""
    kind, _, query = spec.partition("?")
    if kind not in SYNTHETIC:
        raise DataError(f"{source}: unknown kind '{kind}'; expected one of {list(SYNTHETIC)}")
    make, defaults = SYNTHETIC[kind]
    k_min = 2 if kind in ("classification", "sequence") else 1
    p = _synthetic_params(source, query, defaults, k_min=k_min)
    rng = np.random.default_rng(p.pop("seed"))
    shape = (p.pop("n"), *((p.pop("t"),) if "t" in p else ()), p.pop("d"))  # (n, [t,] d)
    values = math.prod(shape)
    steps = f"t={shape[1]} steps of " if len(shape) == 3 else ""
    too_big = DataError(f"{source}: n={shape[0]} rows of {steps}d={shape[-1]} features need "
                        f"{values * 8 / 2**30:,.1f} GiB of memory (and the labels more); there "
                        f"is not that much")
    if values * 8 > sys.maxsize:  # numpy cannot shape it: a ValueError, not a MemoryError
        raise too_big
    try:
        X = rng.standard_normal(shape)
        made = make(rng, X, **p)
    except MemoryError:
        raise too_big from None
    y, lengths = made if len(shape) == 3 else (made, None)
    return Dataset(X, y, _default_names(X), "y", source, lengths)


# Classes or outputs of a synthetic teacher: its (n, k) outputs are drawn in full, and a network
# with more output units than this is no test problem, only an allocation that fails.
MAX_OUTPUTS = 65536


def _synthetic_params(source: str, query: str, defaults: dict, k_min: int) -> dict:
    """Parse and range-check the query parameters of a synthetic source."""
    p = dict(defaults)
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in defaults:
            raise DataError(f"{source}: unknown parameter '{key}'; "
                            f"expected one of {list(defaults)}")
        kind = type(defaults[key])
        try:
            p[key] = kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise DataError(f"{source}: parameter '{key}' expected {what}, got {value!r}") from None
    lowest = {"n": 1, "d": 1, "k": k_min, "seed": 0, "noise": 0.0, "t": 1, "varlen": 0}
    for key, value in p.items():
        if not value >= lowest[key]:
            raise DataError(f"{source}: parameter '{key}' expected >= {lowest[key]}, got {value}")
    if p.get("varlen", 0) > 1:
        raise DataError(f"{source}: parameter 'varlen' expected 0 or 1, got {p['varlen']}")
    if p.get("k", 1) > MAX_OUTPUTS:
        raise DataError(f"{source}: parameter 'k' expected <= {MAX_OUTPUTS}, got {p['k']}")
    return p
