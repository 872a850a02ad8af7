"""The `distnn` command line end to end, and the model file behind evaluate/predict/info.

Commands run as `python -m distnn ...` subprocesses in a temporary directory, each with a time limit.
The `-n 2` tests start their own mpiexec, so this module is skipped inside an MPI job: run it under
plain pytest. The model tests at the end compare Model.scores with scikit-learn's metrics.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distnn import cli, data
from distnn.checkpoint import CheckpointError
from distnn.config import load_config
from distnn.model import load_model, save_model

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = next((str(p) for p in (Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec"))
                if p and os.access(p, os.X_OK)), None)
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec beside python or on PATH")
pytestmark = pytest.mark.skipif("PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ,
                                reason="starts its own processes and mpiexec: run under plain pytest")
CLASSES = np.array(["setosa", "versicolor", "virginica"])

CONFIG = """
out_dir = "run"
[model]
hidden = [8]
activation = "tanh"
family = "multinomial"
dtype = "float32"
[data]
source = "flowers.csv"
target = "species"
val_fraction = 0.25
[optim]
name = "adam"
lr = 0.01
[train]
batch_size = 64
epochs = 3
seed = 5
"""


def distnn(cwd, *args, timeout=60, **env):
    """Run `python -m distnn ARGS` in cwd; the completed process (text output)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    base = {k: v for k, v in os.environ.items() if k not in ("MPIEXEC", "DISTNN_PROGRESS")}
    return subprocess.run([sys.executable, "-m", "distnn", *map(str, args)], cwd=cwd,
                          env=base | {"PYTHONPATH": path} | env, capture_output=True, text=True,
                          timeout=timeout)


def flowers(n=120, seed=0):
    """(X (n, 4), y (n,) class names): three Gaussian clusters."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 4)) + 2.0 * codes[:, None] * np.array([1.0, -0.5, 0.3, 0.0]) + 10.0
    return X, CLASSES[codes]


def write_csv(path, X, y, names=("a", "b", "c", "d"), target="species"):
    rows = [",".join([*names, target])]
    rows += [",".join([*(repr(float(v)) for v in x), str(t)]) for x, t in zip(X, y)]
    Path(path).write_text("\n".join(rows) + "\n")


@pytest.fixture
def work(tmp_path):
    """A directory with flowers.csv and cfg.toml (3 epochs, float32, string class labels)."""
    write_csv(tmp_path / "flowers.csv", *flowers())
    (tmp_path / "cfg.toml").write_text(CONFIG)
    return tmp_path


def records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def one_error_line(done):
    """Exit code 2 and exactly one line on stderr, "distnn: error: ...", no traceback."""
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("distnn: error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# ------------------------------------------------------------------------------------- train

def test_a_run_writes_its_directory_and_predict_reproduces_the_trainers_numbers(work):
    done = distnn(work, "train", "cfg.toml")
    assert done.returncode == 0, done.stderr
    run = work / "run"
    assert {p.name for p in run.iterdir()} >= {"config.toml", "metrics.jsonl", "checkpoints",
                                               "model.npz", "curves.png", "done.json"}
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(run / "config.toml") == load_config(work / "cfg.toml")
    history = records(run)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert len(done.stdout.splitlines()) == 4  # one line per epoch and the final one
    record = json.loads((run / "done.json").read_text())
    assert (record["epochs"], record["ranks"], record["last"]) == (3, 1, history[-1])

    # The validation rows, as the trainer split them, in a file of their own.
    X, y = flowers()
    _, val = data.train_val_split(len(X), 0.25, seed=5)
    write_csv(work / "val.csv", X[val], y[val])
    scores = json.loads(distnn(work, "evaluate", "run/model.npz", "val.csv", "--json").stdout)
    # float32: standardizing before the cast (not after, as the trainer does) moves the loss by ~1e-8
    assert scores["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-12, abs=0)
    assert scores["accuracy"] == history[-1]["val_accuracy"]

    assert distnn(work, "predict", "run/model.npz", "val.csv", "-o", "pred.csv").returncode == 0
    header, *rows = [line.split(",") for line in (work / "pred.csv").read_text().splitlines()]
    assert header == ["p_setosa", "p_versicolor", "p_virginica", "label"]
    model = load_model(run / "model.npz")
    probabilities = np.array([r[:3] for r in rows], np.float64).astype(np.float32)
    assert np.array_equal(probabilities, model.predict(X[val]))  # every bit, through text
    labels = np.array([r[3] for r in rows])
    assert np.array_equal(labels, model.predict_labels(X[val]))
    assert np.mean(labels == y[val]) == history[-1]["val_accuracy"]


def test_predict_needs_no_labels(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    X, y = flowers(10, seed=3)
    write_csv(work / "labelled.csv", X, y)
    (work / "features.csv").write_text("\n".join(
        ["d,c,b,a", *(",".join(repr(float(v)) for v in x[::-1]) for x in X)]) + "\n")  # reordered
    np.savez(work / "features.npz", X=X)
    write_csv(work / "blank.csv", X, [""] * len(X))  # the target column is there, but empty
    outputs = []
    for source in ("labelled.csv", "features.csv", "features.npz", "blank.csv"):
        done = distnn(work, "predict", "run/model.npz", source, "-o", f"{source}.out")
        assert done.returncode == 0, done.stderr
        outputs.append((work / f"{source}.out").read_text())
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]


def test_resume_continues_exactly_where_the_run_stopped(work):
    assert distnn(work, "train", "cfg.toml", "--out", "full", "--set", "train.epochs=4").returncode == 0
    assert distnn(work, "train", "cfg.toml", "--out", "part", "--set", "train.epochs=2").returncode == 0
    (work / "part" / "done.json").write_text("{}")  # stale: the resumed run must replace it
    resumed = distnn(work, "train", "cfg.toml", "--out", "part", "--set", "train.epochs=4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("epoch 3/4")  # no epoch trained twice
    full, part = (load_model(work / d / "model.npz").net.params for d in ("full", "part"))
    assert np.array_equal(full, part)
    assert without_seconds(records(work / "part")) == without_seconds(records(work / "full"))
    assert json.loads((work / "part" / "done.json").read_text())["epochs"] == 4


def test_resume_refuses_a_checkpoint_of_another_network(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    before = (work / "run" / "config.toml").read_text()
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume", "--set", "model.hidden=[5]"))
    assert "differs from the config's (sizes [4, 8, 3] there, [4, 5, 3] here)" in line
    assert (work / "run" / "config.toml").read_text() == before  # the refused run wrote nothing


@pytest.mark.parametrize("change", ["train.seed=6", "data.val_fraction=0.3", "train.batch_size=32"])
def test_resume_refuses_other_data_settings_which_would_mix_training_and_validation_rows(work, change):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume", "--set", change))
    assert f"{change.split('=')[0]} " in line and "other data settings" in line


def test_resume_accepts_settings_that_keep_the_split_and_order(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    done = distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=2",
                  "--set", "train.chunk_size=16", "--set", "optim.lr=0.02")
    assert done.returncode == 0, done.stderr


def test_a_batch_larger_than_the_training_rows_is_refused_before_the_run_directory_is_touched(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    before = {p.name: p.read_bytes() for p in (work / "run").rglob("*") if p.is_file()}
    line = one_error_line(distnn(work, "train", "cfg.toml", "--set", "train.batch_size=1000"))
    assert "90 training rows, fewer than train.batch_size 1000" in line
    assert {p.name: p.read_bytes() for p in (work / "run").rglob("*") if p.is_file()} == before


def test_resume_without_a_checkpoint_starts_afresh(work):
    done = distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=1")
    assert done.returncode == 0, done.stderr
    assert len(records(work / "run")) == 1


def test_divergence_stops_with_exit_code_1_and_one_message(work):
    (work / "cfg.toml").write_text(CONFIG.replace('"multinomial"', '"poisson"')
                                   .replace('"flowers.csv"', '"synthetic:poisson?n=200"')
                                   .replace('target = "species"', "").replace("0.01", "100.0"))
    done = distnn(work, "train", "cfg.toml")
    assert done.returncode == 1
    assert "distnn: training diverged at epoch 1, step" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (work / "run" / "done.json").exists()


@needs_mpiexec
def test_two_ranks_in_deterministic_mode_give_the_bits_of_one(work):
    # standardization included: its moments are summed exactly, whatever the rank count
    settings = ["--set", "train.deterministic=true", "--set", "train.batch_size=16"]
    one = distnn(work, "train", "cfg.toml", "--out", "one", *settings)
    two = distnn(work, "train", "cfg.toml", "--out", "two", "-n", "2", *settings)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    done = [json.loads((work / d / "done.json").read_text()) for d in ("one", "two")]
    assert [(d["ranks"], d["threads"]) for d in done] == [(1, 1), (2, 1)]  # 1 thread at any P
    assert without_seconds(records(work / "one")) == without_seconds(records(work / "two"))
    a, b = (load_model(work / d / "model.npz") for d in ("one", "two"))
    assert np.array_equal(a.net.params, b.net.params)
    digests = [line for d in ("one", "two") for line in
               distnn(work, "info", f"{d}/model.npz").stdout.splitlines() if line.startswith("digest")]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests[0].split()[-1] == hashlib.sha256(a.net.params.tobytes()).hexdigest()[:16]
    assert np.array_equal(a.scaler.mean, b.scaler.mean) and np.array_equal(a.scaler.scale,
                                                                           b.scaler.scale)


@needs_mpiexec
def test_sigterm_to_the_launcher_checkpoints_and_exits_143_then_resume_finishes(work):
    cmd = [sys.executable, "-m", "distnn", "train", "cfg.toml", "-n", "2",
           "--set", "train.epochs=100000", "--set", "train.batch_size=8"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 30
    while not (work / "run" / "metrics.jsonl").is_file() or not records(work / "run"):
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if line.startswith("distnn:")] == \
        [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert list((work / "run" / "checkpoints").glob("ckpt-*.npz"))
    assert not (work / "run" / "done.json").exists()
    epochs = len(records(work / "run")) + 1
    done = distnn(work, "train", "cfg.toml", "-n", "2", "--resume",
                  "--set", f"train.epochs={epochs}", "--set", "train.batch_size=8")
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in records(work / "run")] == list(range(1, epochs + 1))


def test_the_launcher_fails_a_run_without_its_completion_record(work):
    fake = work / "fake-mpiexec"
    fake.write_text("#!/bin/sh\nexit ${FAKE_EXIT:-0}\n")  # "succeeds" without running any rank
    fake.chmod(0o755)
    (work / "run").mkdir()
    (work / "run" / "done.json").write_text("{}")  # stale, from an earlier run
    done = distnn(work, "train", "cfg.toml", "-n", "2", MPIEXEC=str(fake))
    assert done.returncode == 1
    assert done.stderr == ("distnn: error: the run ended without its completion record "
                           "(a rank exited early?)\n")
    assert distnn(work, "train", "cfg.toml", "-n", "2", MPIEXEC=str(fake), FAKE_EXIT="7").returncode == 7


# ----------------------------------------------------------------------------------- bad input

BAD_CONFIGS = {  # case: (how the good config is spoiled, what the one line says)
    "unknown key": (("hidden =", "hiden ="), "model.hiden: unknown key; did you mean model.hidden?"),
    "wrong type": (("epochs = 3", "epochs = 'ten'"), "train.epochs: expected an integer"),
    "bad value": (('"tanh"', '"rleu"'), "model.activation: expected one of"),
    "invalid TOML": (("[model]", "[model"), "cfg.toml: invalid TOML"),
    "no data source": (('source = "flowers.csv"', ""), "data.source: required key is missing"),
    "missing data file": (("flowers.csv", "nope.csv"), "no such data file: nope.csv"),
    "ragged CSV": (("flowers.csv", "ragged.csv"), "ragged.csv line 3: 4 fields, expected 5"),
    "NaN in X": (("flowers.csv", "nan.csv"), "nan.csv: X row 1, column 2 is NaN"),
    "target for another family": (('"multinomial"', '"bernoulli"'),
                                  "flowers.csv: target 'species': bernoulli targets must be numbers"),
    "label unknown to the model": (("[optim]", 'test_source = "tulips.csv"\n[optim]'),
                                   "label 'tulip' at row 0 is not one of the model's classes"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_input_is_one_line_and_exit_code_2_and_nothing_written(work, case):
    (old, new), message = BAD_CONFIGS[case]
    (work / "ragged.csv").write_text("a,b,c,d,species\n1,2,3,4,x\n1,2,3,y\n")
    (work / "nan.csv").write_text("a,b,c,d,species\n1,2,3,4,x\n1,2,nan,4,y\n")
    write_csv(work / "tulips.csv", flowers(5)[0], ["tulip"] * 5)
    assert old in CONFIG
    (work / "cfg.toml").write_text(CONFIG.replace(old, new))
    assert message in one_error_line(distnn(work, "train", "cfg.toml"))
    assert not (work / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "missing.toml"], "no such config file: missing.toml"),
    (["train", "cfg.toml", "--set", "model.l2"], "override 'model.l2': no '='"),
    (["train", "cfg.toml", "--set", "model.lr=1"], "model.lr: unknown key; did you mean optim.lr?"),
    (["train", "cfg.toml", "--out", ""], "--out: expected a directory"),
    (["evaluate", "nothing.npz", "flowers.csv"], "nothing.npz: no such checkpoint file"),
    (["info", "flowers.csv"], "not a zip/npz archive"),
])
def test_command_errors_are_one_line_and_exit_code_2(work, args, message):
    assert message in one_error_line(distnn(work, *args))


@needs_mpiexec
def test_a_data_error_under_two_ranks_is_said_once(work):
    line = one_error_line(distnn(work, "train", "cfg.toml", "-n", "2", "--set", "data.source=nope.csv"))
    assert line == "distnn: error: no such data file: nope.csv"


@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["train"], ["train", "c.toml", "-n", "0"], ["train", "c.toml", "--threads", "-1"],
    ["train", "c.toml", "--nope"], ["predict", "m.npz", "d.csv"], ["plot"],
])
def test_bad_flags_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: distnn") and "Traceback" not in err


def test_model_commands_refuse_a_training_checkpoint(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    ckpt = next((work / "run" / "checkpoints").glob("ckpt-*.npz"))
    assert "a training checkpoint; expected a model" in one_error_line(distnn(work, "info", ckpt))
    np.savez(work / "three.npz", X=np.zeros((4, 3)), y=CLASSES[[0, 1, 2, 0]])
    line = one_error_line(distnn(work, "evaluate", "run/model.npz", "three.npz", "--target", "y"))
    assert "X has shape (4, 3); the model takes (N, 4): 4 features (a, b, c, d)" in line
    info = distnn(work, "info", "run/model.npz").stdout
    assert "4 -> 8 -> 3" in info and "setosa, versicolor, virginica" in info
    assert distnn(work, "plot", "run", "-o", "again.png").returncode == 0
    assert (work / "again.png").read_bytes()[:4] == b"\x89PNG"


def test_example_configs_parse():
    configs = sorted((REPO / "examples").glob("*.toml"))
    assert {p.stem for p in configs} >= {"digits", "breast_cancer", "diabetes", "poisson"}
    for path in configs:
        cfg = load_config(path)
        assert path.read_text().startswith("#"), f"{path.name}: no comment header"
        assert cfg.out_dir == f"runs/{path.stem}"


# ------------------------------------------------------------------------------ the model file

def test_model_scores_agree_with_scikit_learn(tmp_path):
    metrics = pytest.importorskip("sklearn.metrics")
    from distnn import Network

    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3))
    for family, y, name, reference in [
            ("gaussian", rng.normal(size=50), "r2", metrics.r2_score),
            ("poisson", rng.poisson(2.0, size=50), "deviance", metrics.mean_poisson_deviance)]:
        net = Network([3, 4, 1], family=family, seed=2)
        save_model(tmp_path / "m.npz", net, meta={"features": ["a", "b", "c"]})
        model = load_model(tmp_path / "m.npz")
        mean = model.predict(X)[:, 0]
        assert np.array_equal(mean, net.predict(X)[:, 0])  # no scaler: the network itself
        scores = model.scores(X, y)
        assert scores[name] == pytest.approx(reference(y, mean), rel=1e-10)
        assert scores["loss"] == pytest.approx(net.loss(X, y), rel=1e-12)
        if family == "poisson":
            null = metrics.mean_poisson_deviance(y, np.full(50, y.mean()))
            assert scores["null_deviance"] == pytest.approx(null, rel=1e-10)


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    from distnn import checkpoint

    checkpoint.save(tmp_path / "t.npz", {"params": np.zeros(3)}, {"kind": "training"})
    with pytest.raises(CheckpointError, match="a training checkpoint"):
        load_model(tmp_path / "t.npz")
    (tmp_path / "x.npz").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a zip"):
        load_model(tmp_path / "x.npz")
