"""`distnn train`, `evaluate`, `predict` and `info` on recurrent models (issue 18), end to end:
sequence data in, one-line refusals of bad sequences, the run's own numbers reproduced by the model
file, resume and a signal mid-run giving the model of an uninterrupted run.

Commands run as `python -m distnn ...` subprocesses (test_cli.py's helpers); the `-n 2` tests start
their own mpiexec, so this module is skipped inside an MPI job.
"""
import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distnn import data
from distnn.model import load_model
from test_cli import distnn, needs_mpiexec, one_error_line, pytestmark, records  # noqa: F401
from test_cli import without_seconds

CONFIG = """
out_dir = "run"
[model]
kind = "recurrent"
state = 6
hidden = [8]
activation = "tanh"
family = "multinomial"
targets = "last"
[data]
source = "seq.npz"
val_fraction = 0.25
[optim]
name = "adam"
lr = 0.02
clip_norm = 1.0
[train]
batch_size = 16
epochs = 3
seed = 3
"""
NAMES = np.array(["down", "flat", "up"])


def sequences(n=96, t=6, d=2, seed=0):
    """(X (n, t, d), labels (n,) names of the trend of feature 0, lengths (n,) in 2..t), with
    NaN in the padding (which nothing may read)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, t + 1, n)
    X = rng.normal(size=(n, t, d))
    trend = rng.integers(0, 3, n)
    X[:, :, 0] += (trend[:, None] - 1) * np.arange(t) * 0.8
    X[np.arange(t) >= lengths[:, None]] = np.nan
    return X, NAMES[trend], lengths


@pytest.fixture
def work(tmp_path):
    X, y, lengths = sequences()
    np.savez(tmp_path / "seq.npz", X=X, y=y, lengths=lengths)
    (tmp_path / "cfg.toml").write_text(CONFIG)
    return tmp_path


def test_train_then_evaluate_predict_and_info_on_a_recurrent_model(work):
    done = distnn(work, "train", "cfg.toml")
    assert done.returncode == 0, done.stderr
    history = records(work / "run")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    model = load_model(work / "run" / "model.npz")
    assert model.recurrent and model.net.state == 6 and model.classes.tolist() == NAMES.tolist()

    # evaluate: the run's held-out sequences give the trainer's own validation figures
    scores = json.loads(distnn(work, "evaluate", "run", "--json").stdout)
    assert scores["split"] == "val" and scores["rows"] == 24
    assert scores["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-12)
    assert scores["accuracy"] == history[-1]["val_accuracy"]

    # predict: one line per sequence, the model's probabilities and labels to the bit
    assert distnn(work, "predict", "run", "seq.npz", "-o", "p.csv").returncode == 0
    header, *rows = list(csv.reader((work / "p.csv").open()))
    assert header == ["p_down", "p_flat", "p_up", "label"]
    X, y, lengths = sequences()
    np.testing.assert_array_equal(np.array([r[:3] for r in rows], float), model.mean(X, lengths))
    assert [r[3] for r in rows] == model.predict(X, lengths).tolist()

    info = distnn(work, "info", "run").stdout
    assert "recurrent 2+6 -> 8 -> 3+6" in info and "state 6 tanh" in info, info
    assert "targets last" in info and "2 features per step, standardized" in info


def test_targets_every_predicts_each_step_that_exists(work):
    X, _, lengths = sequences()
    y = np.cumsum(np.nan_to_num(X[:, :, 0]), axis=1)  # a running sum per step
    y[np.arange(6) >= lengths[:, None]] = np.nan       # padding: never scored
    np.savez(work / "every.npz", X=X, y=y, lengths=lengths)
    done = distnn(work, "train", "cfg.toml", "--set", "model.targets=every", "--set",
                  "model.family=gaussian", "--set", "data.source=every.npz", "--set",
                  "train.epochs=30")
    assert done.returncode == 0, done.stderr
    scores = json.loads(distnn(work, "evaluate", "run", "--json").stdout)
    assert scores["r2"] > 0.5 and scores["loss"] == pytest.approx(records(work / "run")[-1]["val_loss"])
    assert distnn(work, "predict", "run", "every.npz", "-o", "p.csv").returncode == 0
    header, *rows = list(csv.reader((work / "p.csv").open()))
    assert header == ["sequence", "step", "mean"]
    assert len(rows) == lengths.sum()  # one line per step that exists, in order
    assert [(int(a), int(b)) for a, b, _ in rows] == [tuple(k) for k in np.argwhere(
        data.alive(lengths, 96, 6))]
    mean = load_model(work / "run").mean(X, lengths)
    np.testing.assert_array_equal([float(r[2]) for r in rows], mean[data.alive(lengths, 96, 6)][:, 0])


@pytest.mark.parametrize("arrays, settings, message", [
    (lambda X, y, L: {"lengths": np.where(np.arange(96) == 5, 9, L)}, [],
     "bad.npz: lengths row 5 is 9; expected 1..6"),
    (lambda X, y, L: {"lengths": L + 0.5}, [], "bad.npz: lengths has dtype float64; expected integers"),
    (lambda X, y, L: {"X": np.where(np.arange(6)[None, :, None] == 1, np.nan, np.nan_to_num(X))},
     [], "bad.npz: X row 0, step 1, feature 0 is NaN"),
    (lambda X, y, L: {"X": np.array([np.zeros((2, 2)), np.zeros((3, 2))], dtype=object),
                      "y": y[:2], "lengths": L[:2]}, [], "holds Python objects"),
    (lambda X, y, L: {"y": y[:-1]}, [], "X has 96 rows but y has shape (95,)"),
    (lambda X, y, L: {"y": np.zeros((96, 5))}, ["model.targets=every", "model.family=gaussian"],
     "target 'y' has shape (96, 5); model.targets = \"every\" takes one per step, (96, 6)"),
    (lambda X, y, L: {"y": np.tile(y[:, None], (1, 6))}, [],
     "one per step; model.targets = \"last\" takes one per sequence"),
    (lambda X, y, L: {"X": np.nan_to_num(X)[:, 0], "lengths": None}, [],
     "X has shape (96, 2) (N, d); a recurrent model takes sequences (N, T, d)"),
    (lambda X, y, L: {}, ["model.kind=dense", "model.state=0"],
     "X holds sequences, shape (96, 6, 2) (N, T, d); a dense model takes rows (N, d)"),
])
def test_bad_sequences_are_one_line_and_exit_code_2_and_nothing_written(work, arrays, settings,
                                                                         message):
    X, y, lengths = sequences()
    given = {"X": X, "y": y, "lengths": lengths} | arrays(X, y, lengths)
    np.savez(work / "bad.npz", **{k: v for k, v in given.items() if v is not None})
    sets = [a for s in ["data.source=bad.npz", *settings] for a in ("--set", s)]
    line = one_error_line(distnn(work, "train", "cfg.toml", *sets))
    assert message in line, line
    assert not (work / "run").exists()


def test_evaluate_and_predict_refuse_rows_for_a_recurrent_model(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    np.savez(work / "rows.npz", X=np.zeros((4, 2)), y=np.zeros(4))
    for command in (["evaluate", "run", "rows.npz"], ["predict", "run", "rows.npz", "-o", "p.csv"]):
        line = one_error_line(distnn(work, *command))
        assert "the recurrent model" in line and "takes sequences (N, T, 2)" in line


def test_resume_of_a_recurrent_run_continues_exactly(work):
    settings = ["--set", "train.bptt=3", "--set", "train.epochs=4"]  # bptt rides in the checkpoint
    assert distnn(work, "train", "cfg.toml", "--out", "full", *settings).returncode == 0
    assert distnn(work, "train", "cfg.toml", "--out", "part", "--set", "train.bptt=3",
                  "--set", "train.epochs=2").returncode == 0
    resumed = distnn(work, "train", "cfg.toml", "--out", "part", *settings, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing at epoch 3" in resumed.stdout
    full, part = (load_model(work / d).net.params for d in ("full", "part"))
    np.testing.assert_array_equal(full, part)
    assert without_seconds(records(work / "part")) == without_seconds(records(work / "full"))
    truncated = load_model(work / "full").net.params
    whole = distnn(work, "train", "cfg.toml", "--out", "whole", "--set", "train.epochs=4")
    assert whole.returncode == 0 and not np.array_equal(load_model(work / "whole").net.params,
                                                        truncated)  # bptt=3 < T=6 does change it


@needs_mpiexec
def test_two_ranks_in_deterministic_mode_give_the_bits_of_one(work):
    settings = ["--set", "train.deterministic=true", "--set", "train.chunk_size=4"]
    one = distnn(work, "train", "cfg.toml", "--out", "one", *settings)
    two = distnn(work, "train", "cfg.toml", "--out", "two", "-n", "2", *settings, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert without_seconds(records(work / "one")) == without_seconds(records(work / "two"))
    a, b = (load_model(work / d) for d in ("one", "two"))
    np.testing.assert_array_equal(a.net.params, b.net.params)
    np.testing.assert_array_equal(a.scaler.mean, b.scaler.mean)


def launch_two_ranks(work, out, *args, point=None):
    """`distnn train cfg.toml -n 2` (a SIGTERM from rank 0 before training step 5 with point
    "step": tests/jobs/fault/sitecustomize.py); (exit code, stdout, stderr)."""
    from test_failures import env

    pid_file = work / f"{out}.pid"
    extra = {} if point is None else {"DISTNN_TEST_SIGNAL": f"{point}:SIGTERM",
                                      "DISTNN_TEST_LAUNCHER_PID": str(pid_file)}
    job = subprocess.Popen([sys.executable, "-m", "distnn", "train", "cfg.toml", "-n", "2", "--out",
                            out, "--set", "train.checkpoint_every=2", *args], cwd=work,
                           env=env() | extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    pid_file.write_text(str(job.pid))
    out, err = job.communicate(timeout=120)
    return job.returncode, out, err


@needs_mpiexec
def test_a_signal_mid_run_then_resume_gives_the_model_of_an_uninterrupted_run(work):
    code, _, err = launch_two_ranks(work, "straight")
    assert code == 0, err
    code, _, err = launch_two_ranks(work, "cut", point="step")
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert not (work / "cut" / "done.json").exists()
    code, out, err = launch_two_ranks(work, "cut", "--resume")
    assert code == 0, err
    assert "continuing at epoch 1, step 6" in out, out
    np.testing.assert_array_equal(load_model(work / "cut").net.params,
                                  load_model(work / "straight").net.params)
    assert [r["epoch"] for r in records(work / "cut")] == [1, 2, 3]


def test_the_digits_read_as_rows_example_parses_and_reads_eight_steps_of_eight():
    from distnn import config, run

    cfg = config.load_config(Path(__file__).resolve().parents[1] / "examples" / "digits_rows.toml")
    job = run.prepare(cfg, 0, 1)
    assert job.X.shape == (1797, 8, 8) and job.net.sizes == [8, 128, 10]
    assert job.net.net.sizes == [8 + 64, 128, 10 + 64]


def test_exploding_gradients_stop_as_divergence_with_exit_code_1_and_one_message(work):
    X, _, lengths = sequences()
    np.savez(work / "reg.npz", X=X, y=np.nansum(X[:, :, 0], axis=1), lengths=lengths)
    done = distnn(work, "train", "cfg.toml", "--set", "data.source=reg.npz", "--set",
                  "model.family=gaussian", "--set", "model.state_activation=relu", "--set",
                  "optim.name=sgd", "--set", "optim.lr=1000.0", "--set", "optim.clip_norm=0.0",
                  "--set", "train.epochs=50")
    assert done.returncode == 1, done.stderr
    assert "distnn: training diverged at epoch" in done.stderr and "optim.clip_norm" in done.stderr
    assert "Traceback" not in done.stderr and not (work / "run" / "done.json").exists()


def test_rows_read_as_steps_are_read_so_again_by_evaluate_and_predict(work):
    from test_cli import flowers, write_csv

    write_csv(work / "flowers.csv", *flowers())  # 4 feature columns: 2 steps of 2
    done = distnn(work, "train", "cfg.toml", "--set", "data.source=flowers.csv", "--set",
                  "data.target=species", "--set", "data.steps=2")
    assert done.returncode == 0, done.stderr
    model = load_model(work / "run")
    assert model.net.sizes[0] == 2
    val = json.loads(distnn(work, "evaluate", "run", "--json").stdout)
    assert val["accuracy"] == records(work / "run")[-1]["val_accuracy"]
    everything = json.loads(distnn(work, "evaluate", "run", "flowers.csv", "--json").stdout)
    assert everything["rows"] == 120
    assert distnn(work, "predict", "run", "flowers.csv", "-o", "p.csv").returncode == 0
    X, _ = flowers()
    header, *rows = list(csv.reader((work / "p.csv").open()))
    assert [r[-1] for r in rows] == model.predict(X.reshape(120, 2, 2)).tolist()


def test_two_labels_per_step_train_a_bernoulli_model_and_come_back_as_labels(work):
    X, _, lengths = sequences()
    y = np.where(np.nan_to_num(X[:, :, 0]) > 0, "high", "low")
    y[np.arange(6) >= lengths[:, None]] = "?"  # padding: no label, never looked at
    np.savez(work / "two.npz", X=X, y=y, lengths=lengths)
    done = distnn(work, "train", "cfg.toml", "--set", "data.source=two.npz", "--set",
                  "model.family=bernoulli", "--set", "model.targets=every", "--set",
                  "train.epochs=20")
    assert done.returncode == 0, done.stderr
    model = load_model(work / "run")
    assert model.classes.tolist() == ["high", "low"]
    assert json.loads(distnn(work, "evaluate", "run", "--json").stdout)["accuracy"] > 0.9
    assert distnn(work, "predict", "run", "two.npz", "-o", "p.csv").returncode == 0
    header, *rows = list(csv.reader((work / "p.csv").open()))
    assert header == ["sequence", "step", "p_low", "label"]
    there = data.alive(lengths, 96, 6)
    assert [r[-1] for r in rows] == model.predict(X, lengths)[there].tolist()
    assert np.mean([r[-1] for r in rows] == y[there]) > 0.9
