"""Property: no malformed config, data file, `--set` override or model file makes the CLI crash.

Hypothesis builds the bad input; each example runs `distnn.cli.main` in this process (MPI.COMM_WORLD
of size 1, no mpiexec) in a fresh temporary directory, under an alarm that turns a hang into a
failure. Every example must end in one of the CLI's documented outcomes (`assert_contract`):

    exit 0   success; train leaves its completion record done.json
    exit 1   train only, with the one line "distnn: training diverged at ..."
    exit 2   one line "distnn: error: ...", and no model, curves, checkpoint or done.json written

and never a traceback or an exception out of main(). Warnings count as stderr lines, as they would
in a plain `distnn` process. test_cli.py checks the wording of particular messages; this file checks
that *every* input gets one. Valid inputs are kept tiny (`tame`): the fuzz is after bad input, not
long runs. `pytest --hypothesis-show-statistics` lists the outcomes each test reached.
"""
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
import tomllib
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from distnn import checkpoint, cli, config
from distnn.data import Standardizer
from distnn.model import save_model
from distnn.network import Network

pytestmark = pytest.mark.skipif("PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ,
                                reason="runs the CLI in this process as a size-1 job: plain pytest")

LIMIT_S = 20  # one example past this is a hang (a valid tiny run takes ~0.1 s)
FINISHED = {"model.npz", "done.json", "curves.png"}  # what a failed command must not leave
LOGS = {"config.toml", "metrics.jsonl"}  # what a run that fails after it started may leave
DIVERGED = LOGS | {".lock", "data.json"}  # a run that diverged had started: it leaves its record
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(n):
    """Settings for a fuzz test of n examples: no deadline, the same examples on every run."""
    return settings(FUZZ, max_examples=n)


# ------------------------------------------------------------------------------ the verdict

class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in distnn swallows it."""


@contextlib.contextmanager
def sandbox():
    """A fresh cwd two levels inside a temp root (so out_dir '..' stays inside it), with the
    process state that `train` changes (excepthook, BLAS threads, environment) put back after."""
    cwd, hook, env = os.getcwd(), sys.excepthook, dict(os.environ)
    with tempfile.TemporaryDirectory() as root, threadpool_limits(limits=None):
        work = Path(root) / "in" / "work"
        work.mkdir(parents=True)
        os.chdir(work)
        os.environ["DISTNN_PROGRESS"] = "0"
        try:
            yield work
        finally:
            os.chdir(cwd)
            sys.excepthook = hook
            os.environ.clear()
            os.environ.update(env)


def files(root):
    """Every file under root."""
    return {p for p in Path(root).rglob("*") if p.is_file()}


@contextlib.contextmanager
def warnings_to_stderr():
    """Warnings printed to stderr as in a plain `distnn` process (pytest would collect them)."""
    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                       ResourceWarning):
            warnings.simplefilter("ignore", hidden)  # as Python's default filters do
        warnings.showwarning = show
        yield


def run(work, *argv):
    """cli.main(argv) under the alarm: (exit code, stderr, names of the files it created)."""
    root = work.parent.parent
    before = files(root)
    out, err = io.StringIO(), io.StringIO()

    def alarm(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, LIMIT_S)  # pytest-timeout's, if it has one
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings_to_stderr():
            code = cli.main([str(a) for a in argv])
    except Hang:
        raise AssertionError(f"distnn {' '.join(map(str, argv))} ran past {LIMIT_S} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))
    return code, err.getvalue(), {p.name for p in files(root) - before}


def assert_contract(result, command="train"):
    """Exit 0 (train: with its completion record), 1 (train: divergence) or 2 (one error line,
    nothing finished written); never a traceback."""
    code, err, new = result
    lines = [line for line in err.splitlines() if not line.startswith("distnn: warning: ")]
    if currently_in_test_context():  # a table-driven test calls this too
        event(f"exit {code}: {err.partition(':')[2].partition(':')[2][:25]}")  # for the statistics
    assert "Traceback" not in err, err
    if code == 0:
        assert command != "train" or "done.json" in new, err
        return
    assert code in (1, 2), (code, err)
    assert len(lines) == 1, err
    if code == 1:
        assert command == "train" and lines[0].startswith("distnn: training diverged at "), err
    else:
        assert lines[0].startswith("distnn: error: "), err
    assert not new & FINISHED and not any(n.startswith("ckpt-") for n in new), (err, new)
    assert new <= (DIVERGED if code == 1 else LOGS), (err, new)


# ---------------------------------------------------------------------------- TOML by hand

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def toml_string(s):
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    def char(c):
        if c in '"\\':
            return "\\" + c
        return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
    return '"' + "".join(map(char, s)) + '"'


def toml_key(k):
    return k if BARE_KEY.match(k) else toml_string(k)


def toml_value(v):
    """Any value the strategies make (bool, int, float incl. nan/inf, str, list, dict) as TOML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml(d):
    """A config dict as TOML: top-level scalars first, then one [table] per dict value."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for name, table in d.items():
        if isinstance(table, dict):
            lines += [f"[{toml_key(name)}]"]
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def same(a, b):
    """Equal as JSON (so NaN equals NaN): the emitter wrote what the strategy meant."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# --------------------------------------------------------------------------- configs

BASE = {"out_dir": "run",
        "model": {"hidden": [4], "activation": "tanh", "family": "multinomial", "dtype": "float64"},
        "data": {"source": "data.csv", "target": "y", "val_fraction": 0.25},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"batch_size": 8, "epochs": 1, "seed": 0}}
KEYS = [*config.TOP_LEVEL] + [f"{s}.{f.name}" for s, cls in config.SECTIONS.items()
                               for f in dataclasses.fields(cls)]
SOURCES = ["data.csv", "missing.csv", "data.txt", "data.npz", "", " ", ".", "sklearn:iris",
           "sklearn:nope", "synthetic:binary?n=30&d=2", "synthetic:classification?n=20&k=1",
           "synthetic:regression?n=20&noise=nan", "synthetic:poisson?n=0", "synthetic:nope",
           "synthetic:binary?n=x", "synthetic:binary?zzz=1", "synthetic:regression?n=9&k=3"]
NAMED = {"model.activation": config.ACTIVATIONS, "model.family": config.FAMILIES,
         "model.dtype": config.DTYPES, "optim.name": config.OPTIMIZERS,
         "optim.schedule": config.SCHEDULES}
AT_HAND = {  # key -> values worth trying besides the random ones
    "data.source": SOURCES, "data.test_source": SOURCES,
    "data.target": ["y", "a", "Y", "", "nope"],
    "data.features": [["a"], ["a", "a"], ["y"], ["zz"], [], ["a", "b", "c"]],
    "model.hidden": [[], [0], [-1], [3, 2], [1.5], [True], [[2]]],
    "optim.betas": [[0.9], [0.9, 1.0], [0.5, 0.5, 0.5], [-0.1, 0.9]],
    **{k: [*names, names[0].upper(), names[0] + " ", "nope"] for k, names in NAMED.items()},
}

NUMBERS = [0, 1, -1, 2, 0.0, -0.0, 0.5, 1e-300, 1e300, math.inf, -math.inf, math.nan, 2**63 - 1]
scalars = st.one_of(
    st.text(max_size=8), st.integers(-3, 40), st.sampled_from([-2**63, 2**63 - 1, 10**9]),
    st.floats(), st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e300, 0.5, 1.5, 1.0]),
    st.booleans())
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.text(max_size=4), scalars, max_size=2))


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def tame(key, value):
    """`value` for `key`, cut so that a valid run stays tiny and writes only inside the sandbox."""
    if key == "out_dir" and isinstance(value, str):
        return value.replace("/", "_").replace("\\", "_")
    if key in ("train.epochs", "train.threads") and is_int(value):
        return min(value, 2)
    if key == "model.hidden" and isinstance(value, list):
        return [min(h, 16) if is_int(h) else h for h in value[:3]]
    return value


def value_for(key):
    """A value for `key`: anything at all, or one of the values worth trying there."""
    return st.one_of(values, st.sampled_from(AT_HAND.get(key, []) + NUMBERS))


@st.composite
def configs(draw):
    """BASE after one or two mutations: a key set to any value (mostly), a key or section
    deleted, an unknown key or section added, a section replaced by a scalar."""
    d = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["set"] * 3 + ["delete", "unknown", "untable"] + ["set"] * 3))
        key = draw(st.sampled_from(KEYS))
        section, _, name = key.rpartition(".")
        table = d.setdefault(section, {}) if section else d
        if not isinstance(table, dict):
            continue
        if op == "set":
            table[name] = tame(key, draw(value_for(key)))
        elif op == "delete":
            (d.pop(section, None) if section and draw(st.booleans()) else table.pop(name, None))
        elif op == "unknown":
            where = table if draw(st.booleans()) else d.setdefault(draw(st.text(max_size=6)), {})
            if isinstance(where, dict):
                where[draw(st.text(max_size=6))] = draw(scalars)
        else:
            d[draw(st.sampled_from(list(config.SECTIONS)))] = draw(scalars)
    return d


def based(changes):
    """BASE with {"section.key": value} changes."""
    d = copy.deepcopy(BASE)
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (d[section] if section else d)[name] = value
    return d


def small_csv(n=24, seed=0):
    """a,b,c features and 3 classes in column y."""
    rng = np.random.default_rng(seed)
    rows = [f"{x[0]!r},{x[1]!r},{x[2]!r},{k}"
            for x, k in zip(rng.normal(size=(n, 3)).tolist(), rng.integers(0, 3, n).tolist())]
    return "a,b,c,y\n" + "\n".join(rows) + "\n"


@fuzz(120)
@given(configs())
@example(based({"optim.name": "sgd", "optim.lr": 1e300}))  # diverges: exit 1
@example(based({"train.bucket_mb": math.inf}))  # passes the config check: > 0
def test_any_config_exits_cleanly(d):
    text = toml(d)
    assert same(tomllib.loads(text), d)
    with sandbox() as work:
        (work / "data.csv").write_text(small_csv())
        (work / "cfg.toml").write_text(text)
        assert_contract(run(work, "train", "cfg.toml"))


# Every numeric key at the ends of what TOML can say: each is refused by a message that starts with
# the key, or the run obeys the contract (exit 0, or 1 for divergence); never an OverflowError.
def type_of(key):
    """The type a dotted key takes, as the config's dataclasses declare it."""
    section, _, name = key.rpartition(".")
    return typing.get_type_hints(config.SECTIONS[section] if section else config.Config)[name]


NUMERIC_KEYS = [k for k in KEYS if type_of(k) in (int, float, list[int], list[float])]
EXTREMES = ["1e308", "-1e308", "inf", "-inf", "nan", "-0.0", "5e-324", "9223372036854775807",
            "9223372036854775808", "1" + "0" * 400, "-1" + "0" * 400, "1" + "0" * 5000]
LONG = {"train.epochs"}  # a valid huge value here is a long run, not a fault
STEPPED = based({"optim.schedule": "step", "optim.step_size": 1})  # so that gamma is used


@pytest.mark.parametrize("text", EXTREMES, ids=lambda t: t if len(t) < 20 else f"{len(t)} digits")
@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_key_at_its_extremes_is_refused_by_name_or_runs(key, text):
    if type_of(key) in (list[int], list[float]):
        text = f"[{text}, {text}]"
    setting = f"{key}={text}"
    try:
        cfg = config.parse_config(STEPPED, [setting])
    except config.ConfigError as e:
        assert str(e).startswith(key), e
        return
    if key in LONG and cfg.train.epochs > 2:
        return
    with sandbox() as work:
        (work / "data.csv").write_text(small_csv())
        (work / "cfg.toml").write_text(toml(STEPPED))
        result = run(work, "train", "cfg.toml", f"--set={setting}")
        assert_contract(result)
        assert result[0] != 2 or key in result[1], result[1]


@st.composite
def spoiled_toml(draw):
    """A valid config's text with characters inserted or deleted, or bytes that are no TOML."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=120))
    text = bytearray(toml(BASE).encode())
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text[i:i] = draw(st.sampled_from([b"[", b"]", b"=", b'"', b"\n", b"\xff", b"#", b"x"]))
        else:
            del text[i:i + draw(st.integers(1, 8))]
    return bytes(text)


@fuzz(100)
@given(spoiled_toml())
def test_broken_toml_exits_cleanly(blob):
    with sandbox() as work:
        (work / "data.csv").write_text(small_csv())
        (work / "cfg.toml").write_bytes(blob)
        assert_contract(run(work, "train", "cfg.toml"))


@st.composite
def overrides(draw):
    """One `--set` argument: a known, misspelt or bare key; '=' or not; any value or raw text."""
    key = draw(st.one_of(st.sampled_from(KEYS), st.sampled_from(["model", "train.", ".lr", "",
                                                                 "model.lr", "a.b.c"]),
                         st.text(max_size=8)))
    if not draw(st.integers(0, 9)):
        return key
    if key in ("out_dir", "train.epochs", "train.threads", "model.hidden") or draw(st.booleans()):
        text = toml_value(tame(key, draw(value_for(key))))
    else:
        text = draw(st.text(max_size=10))
    return f"{key}={text}"


@fuzz(150)
@given(st.lists(overrides(), min_size=1, max_size=3))
def test_any_override_exits_cleanly(items):
    with sandbox() as work:
        (work / "data.csv").write_text(small_csv())
        (work / "cfg.toml").write_text(toml(BASE))
        assert_contract(run(work, "train", "cfg.toml", *(f"--set={s}" for s in items)))


# ---------------------------------------------------------------------------- data files
# Each case starts from a small valid data set whose targets fit the family and applies one or two
# spoilers, so that each fault is met alone and in pairs; some spoilers leave the data valid (a
# float32 X, labels that happen to fit), so the runs that parse go on to train.

LABELS = {  # kind of target column -> (rng, n) -> (n,) labels
    "classes": lambda r, n: r.integers(0, 3, n),
    "names": lambda r, n: np.array(["a", "b"])[r.integers(0, 2, n)],
    "binary": lambda r, n: r.integers(0, 2, n),
    "counts": lambda r, n: r.poisson(2.0, n),
    "real": lambda r, n: r.normal(size=n),
    "negative": lambda r, n: r.integers(-3, 0, n),
    "half": lambda r, n: np.full(n, 0.5),
}
FITTING = {"multinomial": ["classes", "names"], "bernoulli": ["binary"], "poisson": ["counts"],
           "gaussian": ["real", "counts"]}
ARRAY_SPOILERS = ["few rows", "labels", "X shape", "X dtype", "y shape", "y dtype", "nan"]
ARRAY_DTYPES = ["float32", "float16", "int64", "int8", "uint8", "bool", "complex128", "<U3",
                "object", ">f8"]
ODD_CELLS = ["", " ", "nan", "NaN", "inf", "-inf", "1e999", "abc", "0x1F", "--1", "1_0", "١٢",
             "\t", '"', "1,5"]


def spoil_array(draw, a, spoiler):
    """`a` reshaped, cast, or with one NaN/Inf."""
    if spoiler.endswith("shape"):
        return np.resize(a, tuple(draw(st.lists(st.integers(0, 4), max_size=3))))
    if spoiler.endswith("dtype"):
        a, dtype = (a.real if a.dtype.kind == "c" else a), draw(st.sampled_from(ARRAY_DTYPES))
        try:
            with np.errstate(invalid="ignore"):  # NaN to an integer type: any value will do
                return a.astype(dtype)
        except ValueError:  # class names as numbers
            return a.astype(object)
    a = a.astype(np.float64) if a.dtype.kind in "biu" else a
    if a.size and a.dtype.kind in "fc":
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return a


@st.composite
def data_sets(draw, spoilers):
    """(family, X, y): X (n, 2) and targets fitting the family, after the array spoilers named."""
    family = draw(st.sampled_from(config.FAMILIES))
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    n = draw(st.integers(0, 3)) if "few rows" in spoilers else draw(st.integers(8, 14))
    X = rng.normal(size=(n, 2))
    kinds = sorted(LABELS) if "labels" in spoilers else FITTING[family]
    y = LABELS[draw(st.sampled_from(kinds))](rng, n)
    for spoiler in spoilers:
        if spoiler in ("X shape", "X dtype", "nan"):
            X = spoil_array(draw, X, spoiler)
        elif spoiler in ("y shape", "y dtype"):
            y = spoil_array(draw, y, spoiler)
    return family, X, y


def spoil_table(draw, table, spoiler):
    """One corruption of a CSV table (rows of cells, the header first)."""
    row = table[draw(st.integers(0, len(table) - 1))]
    if spoiler == "cell" and row:
        row[draw(st.integers(0, len(row) - 1))] = draw(st.sampled_from(ODD_CELLS)
                                                       | st.text(max_size=4))
    elif spoiler == "ragged":
        (row.pop() if row and draw(st.booleans()) else row.append("1.5"))
    elif spoiler == "blank":
        table.insert(draw(st.integers(0, len(table))), [])
    elif spoiler == "header" and table[0]:
        table[0][draw(st.integers(0, len(table[0]) - 1))] = draw(st.text(max_size=3))
    elif spoiler == "duplicate" and table[0]:
        table[0][0] = table[0][-1]


def spoil_bytes(draw, blob):
    """The bytes cut short, with one byte changed, or with a few bytes spliced in."""
    op, i = draw(st.sampled_from(["cut", "flip", "splice"])), draw(st.integers(0, len(blob)))
    if op == "cut":
        return blob[:i]
    if op == "flip" and i < len(blob):
        return blob[:i] + bytes([blob[i] ^ draw(st.integers(1, 255))]) + blob[i + 1:]
    junk = draw(st.sampled_from([b"\xff\xfe", b"\xef\xbb\xbf", b"\x00", b'"', b"\r", b"\n\n"]))
    return blob[:i] + junk + blob[i:]


TARGETS = ["", "nope", "Y", "x0", "X"]  # the "target" spoiler: names that are not the targets
CSV_SPOILERS = ["few rows", "labels", "nan", "cell", "ragged", "blank", "header", "duplicate",
                "target", "bytes"]


@st.composite
def csv_cases(draw):
    """(files, source, target, family): a CSV with columns x0.. and y, maybe spoiled."""
    spoilers = draw(st.lists(st.sampled_from(CSV_SPOILERS), min_size=1, max_size=2))
    family, X, y = draw(data_sets(spoilers))
    table = [[*(f"x{j}" for j in range(X.shape[1])), "y"]]
    table += [[*map(repr, row), str(label)] for row, label in zip(X.tolist(), y.tolist())]
    for spoiler in spoilers:
        spoil_table(draw, table, spoiler)
    blob = "".join(",".join(r) + "\n" for r in table).encode()
    blob = spoil_bytes(draw, blob) if "bytes" in spoilers else blob
    target = draw(st.sampled_from(TARGETS)) if "target" in spoilers else "y"
    return {"data.csv": blob}, "data.csv", target, family


def npy_bytes(a, fortran=False):
    out = io.BytesIO()
    np.save(out, np.asfortranarray(a) if fortran else a, allow_pickle=True)  # object arrays too
    return out.getvalue()


NPZ_SPOILERS = ARRAY_SPOILERS + ["key", "target", "bytes"]


def npz_bytes(members, compressed=False):
    out = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(out, **members)
    return out.getvalue()


@st.composite
def npz_cases(draw):
    """An .npz of X and y, plain or compressed, maybe spoiled (arrays, member names, bytes)."""
    spoilers = draw(st.lists(st.sampled_from(NPZ_SPOILERS), min_size=1, max_size=2))
    family, X, y = draw(data_sets(spoilers))
    members = {"X": X, "y": y}
    if "key" in spoilers:
        renamed = members.pop(draw(st.sampled_from("Xy")))
        members[draw(st.sampled_from(["x", "Y", "data"]))] = renamed
    blob = npz_bytes(members, compressed=draw(st.booleans()))
    blob = spoil_bytes(draw, blob) if "bytes" in spoilers else blob
    target = draw(st.sampled_from(TARGETS)) if "target" in spoilers else "y"
    return {"data.npz": blob}, "data.npz", target, family


NPY_SPOILERS = ARRAY_SPOILERS + ["target", "bytes", "missing"]


@st.composite
def npy_cases(draw):
    """X.npy (C or Fortran order) and its targets X_y.npy, maybe spoiled or missing."""
    spoilers = draw(st.lists(st.sampled_from(NPY_SPOILERS), min_size=1, max_size=2))
    family, X, y = draw(data_sets(spoilers))
    found = {"X.npy": npy_bytes(X, fortran=draw(st.booleans())), "X_y.npy": npy_bytes(y)}
    name = draw(st.sampled_from(sorted(found)))
    if "bytes" in spoilers:
        found[name] = spoil_bytes(draw, found[name])
    if "missing" in spoilers:
        del found[name]
    target = draw(st.sampled_from(TARGETS + ["X.npy"])) if "target" in spoilers else "X_y.npy"
    return found, "X.npy", target, family


def train_on(case):
    """Write the case's files, point BASE at them with its family, and train."""
    found, source, target, family = case
    d = copy.deepcopy(BASE)
    d["data"].update(source=source, target=target)
    d["model"]["family"] = family
    d["train"]["batch_size"] = 4
    with sandbox() as work:
        for name, blob in found.items():
            (work / name).write_bytes(blob)
        (work / "cfg.toml").write_text(toml(d))
        assert_contract(run(work, "train", "cfg.toml"))


@fuzz(120)
@given(csv_cases())
@example(({"data.csv": b"x0,y\n1e200,0\n" + b"1,1\n" * 11}, "data.csv", "y", "bernoulli"))
def test_any_csv_file_exits_cleanly(case):  # the example: finite, but its square overflows
    train_on(case)


def bad_header(blob):
    """.npy bytes (alone or inside an uncompressed .npz) whose header dict lost its '{'."""
    return blob.replace(b"{'descr'", b"z'descr'", 1)


@fuzz(120)
@given(npz_cases())
@example(({"data.npz": npz_bytes({"X": np.ones((12, 2)), "y": np.array([1j, 2j, 3j] * 4)})},
          "data.npz", "y", "multinomial"))  # class labels that the model file's JSON cannot hold
@example(({"data.npz": bad_header(npz_bytes({"X": np.ones((12, 2)), "y": np.ones(12)}))},
          "data.npz", "y", "gaussian"))
def test_any_npz_file_exits_cleanly(case):
    train_on(case)


@fuzz(100)
@given(npy_cases())
@example(({"X.npy": bad_header(npy_bytes(np.ones((12, 2)))), "X_y.npy": npy_bytes(np.ones(12))},
          "X.npy", "X_y.npy", "gaussian"))
def test_any_npy_files_exit_cleanly(case):
    train_on(case)


@fuzz(200)
@given(st.one_of(csv_cases(), npz_cases(), npy_cases()), st.sampled_from(["evaluate", "predict"]))
def test_evaluate_and_predict_exit_cleanly_on_any_data_file(case, command):
    found, source, target, family = case
    net = Network([2, 4, 3 if family == "multinomial" else 1], family=family, seed=1)
    with sandbox() as work:
        for name, blob in found.items():
            (work / name).write_bytes(blob)
        save_model(net, work / "model.npz", classes=[0, 1, 2] if family == "multinomial" else None,
                   meta={"features": ["x0", "x1"], "target": target})
        argv = [command, "model.npz", source, *(["-o", "out.csv"] if command == "predict" else [])]
        assert_contract(run(work, *argv), command=command)


# ---------------------------------------------------------------------------- model files
# Every example runs each of these against the one model file it wrote (model.npz).

MODEL_COMMANDS = [["info", "model.npz"], ["evaluate", "model.npz", "data.csv"],
                  ["evaluate", "model.npz", "data.csv", "--json", "--target", "a"],
                  ["predict", "model.npz", "data.csv", "-o", "out.csv"]]
CLASSES = ["c0", "c1", "c2"]
MODEL_DATA = "a,b,c,y\n" + "".join(f"{i},{-i},{i / 2},{CLASSES[i % 3]}\n" for i in range(6))


def model_commands_obey_the_contract(work):
    """Each of MODEL_COMMANDS in turn on work/model.npz."""
    for argv in MODEL_COMMANDS:
        assert_contract(run(work, *argv), command=argv[0])


def good_model(path):
    """A 3 -> 4 -> 3 multinomial model with a standardizer, as train writes it."""
    net = Network([3, 4, 3], activation="tanh", family="multinomial", seed=1)
    save_model(net, path, scaler=Standardizer(np.zeros(3), np.ones(3)), classes=CLASSES,
               meta={"source": "data.csv", "target": "y", "features": ["a", "b", "c"],
                     "metrics": {"epochs": 1, "steps": 3, "ranks": 1, "val": {"loss": 1.0}}})


@st.composite
def any_arrays(draw):
    """A small array of any shape and dtype, or with a NaN or Inf."""
    a = np.random.default_rng(draw(st.integers(0, 3))).normal(size=draw(st.integers(0, 40)))
    return spoil_array(draw, a, draw(st.sampled_from(["shape", "dtype", "nan"])))


@st.composite
def broken_models(draw):
    """How model.npz is spoiled: random bytes, a real model file cut, altered or spliced, or an
    .npz that distnn did not write."""
    kind = draw(st.sampled_from(["bytes", "real", "real", "foreign"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=64))
    if kind == "foreign":
        return kind, {draw(st.sampled_from(["params", "__format__", "X"])): draw(any_arrays())}
    return kind, (draw(st.sampled_from(["cut", "flip", "splice"])),
                  draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(1, 255)))


def write_broken(path, recipe):
    kind, how = recipe
    if kind == "bytes":
        path.write_bytes(how)
    elif kind == "foreign":
        np.savez(path, **how)
    else:
        good_model(path)
        blob = path.read_bytes()
        op, where, byte = how
        i = int(where * len(blob))
        spoiled = {"cut": blob[:i], "flip": blob[:i] + bytes([blob[i] ^ byte]) + blob[i + 1:],
                   "splice": blob[:i] + bytes([byte]) + blob[i:]}
        path.write_bytes(spoiled[op])


@fuzz(120)
@given(broken_models())
def test_model_commands_refuse_broken_model_files(recipe):
    with sandbox() as work:
        (work / "data.csv").write_text(MODEL_DATA)
        write_broken(work / "model.npz", recipe)
        model_commands_obey_the_contract(work)


SPEC = {"sizes": [3, 4, 3], "activation": "tanh", "family": "multinomial", "l1": 0.0, "l2": 0.0,
        "dtype": "float64"}
META = {"kind": "model", "classes": CLASSES, "target": "y", "features": ["a", "b", "c"],
        "source": "data.csv", "metrics": {"epochs": 1, "steps": 3, "ranks": 1,
                                          "val": {"loss": 1.0}}}
ARRAYS = {"params": np.zeros(31), "scaler/mean": np.zeros(3), "scaler/scale": np.ones(3)}
FORGED = {  # entry -> values worth trying besides the random ones
    "sizes": [[3, 3], [3, 4, 1], [2, 4, 3], [3], [3, 4, 50]], "activation": ["relu", "nope"],
    "family": [*config.FAMILIES, "nope"], "dtype": ["float32", "int8"],
    "kind": ["training", None], "classes": [[1, 2, 3], ["c0", "c0", "c1"], [[1], [2], [3]], None],
    "target": ["a", "nope", 5, None, ["y"], ""], "source": [None, 5],
    "features": [["a", "b"], ["a", "b", "c", "d"], ["y", "b", "c"], [1, 2, 3], "abc", 5, None],
    "metrics": [[1], {"val": 3}, {"val": {"loss": "x"}}, {"epochs": None}, 5, "x"],
}


@st.composite
def forged_models(draw):
    """(arrays, meta) of a model file with a valid checksum but content distnn never writes:
    up to two meta entries, network spec entries or arrays replaced."""
    spec, meta, arrays_ = dict(SPEC), copy.deepcopy(META), dict(ARRAYS)
    meta["network"] = spec
    for where in draw(st.lists(st.sampled_from([*SPEC, *META, *ARRAYS]), max_size=2)):
        if where in ARRAYS:
            arrays_[where] = draw(any_arrays())
            continue
        value = draw(st.one_of(values, st.sampled_from(FORGED.get(where, [None]))))
        if where == "sizes" and isinstance(value, list):
            value = [min(s, 50) if is_int(s) else s for s in value]  # no big allocations
        (spec if where in SPEC else meta)[where] = value
    return arrays_, meta


@fuzz(150)
@given(forged_models())
@example(({"params": np.zeros(31)},  # a network of 10^14 parameters, claimed
          {"kind": "model", "network": {"sizes": [10**7, 10**7, 2]}, "classes": [0, 1]}))
def test_model_commands_refuse_forged_model_files(forged):
    with sandbox() as work:
        (work / "data.csv").write_text(MODEL_DATA)
        try:
            checkpoint.save(work / "model.npz", *forged)
        except checkpoint.CheckpointError:
            return  # an object array: not even a file
        model_commands_obey_the_contract(work)
