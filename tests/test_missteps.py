"""Misuse that still runs gets a warning, and a message says what to do next: the command line
as a new user meets it (subprocesses, as in test_cli.py), and the pieces behind the messages."""
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from distnn import SGD, Adam, AdamW, data, stopping
from distnn.network import Network
from distnn.config import ConfigError, load_config
from distnn.data import DataError
from distnn.rundir import _say_resuming
from test_cli import CONFIG, MPIEXEC, distnn, flowers, needs_mpiexec, pytestmark, write_csv  # noqa: F401


@pytest.fixture
def work(tmp_path):
    write_csv(tmp_path / "flowers.csv", *flowers())
    (tmp_path / "cfg.toml").write_text(CONFIG)
    return tmp_path


def train_on_cpus(work, cpus, *args):
    """`distnn train cfg.toml ARGS` whose processes (mpiexec's ranks too) may run on `cpus` only."""
    return subprocess.run([sys.executable, "-m", "distnn", "train", "cfg.toml", *args], cwd=work,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.sched_setaffinity(0, set(cpus)))


def warnings_of(done):
    return [line for line in done.stderr.splitlines() if line.startswith("distnn: warning:")]


# ----------------------------------------------------------------- settings that waste the machine

@needs_mpiexec
def test_more_ranks_than_cores_is_warned_of(work):
    done = train_on_cpus(work, [0], "-n", "2")
    assert done.returncode == 0, done.stderr
    [line] = warnings_of(done)
    assert "2 ranks share the 1 cores of this node" in line and "at most 1 per node" in line


def test_more_blas_threads_than_cores_is_warned_of(work):
    done = train_on_cpus(work, [0], "--threads", "2")
    assert done.returncode == 0, done.stderr
    [line] = warnings_of(done)
    assert "2 BLAS threads x 1 ranks on 1 cores" in line and "--threads 1" in line


@needs_mpiexec
def test_a_batch_smaller_than_the_ranks_is_warned_of(work):
    done = distnn(work, "train", "cfg.toml", "-n", "2", "--set", "train.batch_size=1",
                  "--set", "train.epochs=1", timeout=180)
    assert done.returncode == 0, done.stderr
    assert any("train.batch_size 1 over 2 ranks leaves 1 of them without samples" in line
               for line in warnings_of(done))


def test_sensible_settings_warn_of_nothing(work):
    done = distnn(work, "train", "cfg.toml")
    assert done.returncode == 0 and warnings_of(done) == [], done.stderr


# ------------------------------------------------------------------- targets a family cannot mean

def test_continuous_class_labels_are_refused_naming_the_row_and_the_fix():
    with pytest.raises(DataError, match=r"y: row 1 holds 151.5, not a class label; .*gaussian"):
        data.encode_labels(np.array([3.0, 151.5, 7.0]), name="y")
    codes, classes = data.encode_labels(np.array([2.0, 1.0, 2.0]))  # whole numbers are labels
    assert codes.tolist() == [1, 0, 1] and classes.tolist() == [1.0, 2.0]


def test_multinomial_on_a_continuous_target_is_refused(work):
    X, _ = flowers()
    write_csv(work / "prices.csv", X, X[:, 0] * 1.5)
    done = distnn(work, "train", "cfg.toml", "--set", "data.source=prices.csv")
    assert done.returncode == 2
    assert done.stderr.startswith("distnn: error: prices.csv: target 'species': row 0 holds")
    assert "gaussian" in done.stderr and len(done.stderr.splitlines()) == 1


def test_multinomial_on_whole_numbers_of_a_continuous_target_is_warned_of(work):
    # diabetes' target is whole numbers: 214 classes in 442 rows
    done = distnn(work, "train", "cfg.toml", "--set", "data.source=sklearn:diabetes",
                  "--set", "data.target=", "--set", "train.epochs=1")
    assert done.returncode == 0, done.stderr
    [line] = warnings_of(done)
    assert "214 classes in 442 rows" in line and "gaussian" in line


def test_many_classes_for_the_rows_are_warned_of(work):
    X, _ = flowers(60)
    write_csv(work / "many.csv", X, np.arange(60) % 20)  # 20 classes, 3 rows each
    done = distnn(work, "train", "cfg.toml", "--set", "data.source=many.csv",
                  "--set", "train.batch_size=8")
    assert done.returncode == 0, done.stderr
    [line] = warnings_of(done)
    assert "20 classes in 60 rows" in line and "gaussian" in line


def test_zero_epochs_are_refused_naming_the_key(tmp_path):
    (tmp_path / "c.toml").write_text("[data]\nsource = 'sklearn:iris'\n[train]\nepochs = 0\n")
    with pytest.raises(ConfigError, match=r"^train\.epochs: .*>= 1"):
        load_config(tmp_path / "c.toml")


def test_bernoulli_on_two_text_labels_learns_them_and_predicts_them(work):
    X, y = flowers()
    write_csv(work / "two.csv", X, np.where(y == "setosa", "setosa", "other"))
    done = distnn(work, "train", "cfg.toml", "--set", "data.source=two.csv",
                  "--set", 'model.family="bernoulli"', "--set", "train.epochs=30")
    assert done.returncode == 0, done.stderr
    done = distnn(work, "predict", "run/model.npz", "two.csv", "-o", "p.csv")
    assert done.returncode == 0, done.stderr
    header, *rows = (work / "p.csv").read_text().splitlines()
    assert header == "p_setosa,label"  # the probability of the second label, sorted
    assert {r.split(",")[1] for r in rows} == {"setosa", "other"}
    done = distnn(work, "evaluate", "run/model.npz", "two.csv")
    assert done.returncode == 0, done.stderr
    assert float(dict(line.split() for line in done.stdout.splitlines())["accuracy"]) > 0.9


def test_bernoulli_on_three_labels_says_to_use_multinomial(work):
    done = distnn(work, "train", "cfg.toml", "--set", 'model.family="bernoulli"')
    assert done.returncode == 2
    assert "has 3 labels" in done.stderr and "multinomial" in done.stderr


# -------------------------------------------------------------------------- what to do next

@needs_mpiexec
def test_a_killed_rank_is_followed_by_the_line_that_resumes(work):
    from test_failures import env  # the fault injector on PYTHONPATH

    (work / "cfg.toml").write_text(CONFIG.replace("epochs = 3", "epochs = 3\ncheckpoint_every = 1")
                                   .replace("batch_size = 64", "batch_size = 8"))
    done = subprocess.run([sys.executable, "-m", "distnn", "train", "cfg.toml", "-n", "2"],
                          cwd=work, env=env("kill:1:15"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert done.stderr.rstrip().endswith(
        "distnn: continue with: distnn train cfg.toml --out run --resume -n 2"), done.stderr


@needs_mpiexec
def test_a_second_ctrl_c_lets_the_checkpoint_finish_and_says_so(work):
    from test_failures import env

    (work / "cfg.toml").write_text(CONFIG.replace("epochs = 3", "epochs = 100000")
                                   .replace("batch_size = 64", "batch_size = 8"))
    job = subprocess.Popen([sys.executable, "-m", "distnn", "train", "cfg.toml", "-n", "2"],
                           cwd=work, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 60
    while not (work / "run" / "metrics.jsonl").exists() or not (
            work / "run" / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.1)
    job.send_signal(signal.SIGINT)
    time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    assert "Ctrl-C again to abort at once" in err and "stopped by SIGINT" in err
    assert "assert" not in err and "BAD TERMINATION" not in err, err
    assert "continue with: distnn train cfg.toml --out run --resume -n 2" in err


def test_the_divergence_message_names_the_checkpoint_with_its_loss(tmp_path):
    ckpt = tmp_path / "ckpt-000000040.npz"
    sane = [{"epoch": 1, "step": 20, "loss": 0.9}, {"epoch": 2, "step": 40, "loss": 0.5}]
    message = str(stopping.diverged("epoch 3, step 45", [ckpt], sane))
    assert f"the last good checkpoint, {ckpt} (epoch 2, step 40, training loss 0.5), is kept" in message
    wild = [{"epoch": 1, "step": 20, "loss": 0.52}, {"epoch": 2, "step": 40, "loss": 1.1e259}]
    message = str(stopping.diverged("epoch 3, step 45", [ckpt], wild))
    assert "good" not in message
    assert "its loss had already grown from 0.52 to 1.1e+259" in message and "--overwrite" in message
    assert "no checkpoint was written" in str(stopping.diverged("epoch 1, step 2", [], []))


@pytest.mark.parametrize("losses, said", [([0.9, 0.5, 0.6], None), ([1.0, 0.5, 60.0], "grown"),
                                          ([0.5, float("inf")], "become inf"),
                                          ([-3.0, -2.0], None), ([-3.0, 400.0], "grown")])
def test_a_loss_has_exploded_when_it_grew_a_hundredfold_or_is_not_finite(losses, said):
    found = stopping.exploded([{"loss": v} for v in losses])
    assert (found is None) if said is None else (said in found)


def test_resuming_a_run_gone_wrong_or_a_stretched_schedule_is_warned_of(tmp_path, capsys):
    (tmp_path / "config.toml").write_text("[data]\nsource = 'sklearn:iris'\n[optim]\n"
                                          "schedule = 'cosine'\n[train]\nepochs = 2\n")
    trainer = SimpleNamespace(epoch=2, epochs=4, step=40, early=SimpleNamespace(stopped=False),
                              history=[{"loss": 0.5}, {"loss": 3e10}],
                              schedule={"schedule": "cosine"})
    _say_resuming(tmp_path, tmp_path / "ckpt-000000040.npz", trainer)
    out, err = capsys.readouterr()
    assert "continuing at epoch 3, step 41" in out
    assert "the training loss had already grown from 0.5 to 3e+10" in err
    assert "cosine learning-rate schedule ran over 2 epochs and now runs over 4" in err


# ------------------------------------------------------------------- the Python API's arguments

@pytest.mark.parametrize("make, named", [
    (lambda: SGD(momentum=1.5), "momentum"), (lambda: SGD(momentum=1.0), "momentum"),
    (lambda: SGD(lr=0.0), "lr"), (lambda: SGD(lr=float("inf")), "lr"),
    (lambda: Adam(betas=(0.9, 1.0)), "betas"), (lambda: Adam(eps=0.0), "eps"),
    (lambda: AdamW(lr=-1e-3), "lr"), (lambda: SGD(momentum=float("nan")), "momentum")])
def test_out_of_range_hyper_parameters_are_refused_naming_them(make, named):
    with pytest.raises(ValueError, match=named):
        make()


@pytest.mark.parametrize("method", ["loss", "gradient"])
def test_a_mean_over_no_samples_is_refused(method):
    net = Network([3, 2], family="gaussian")
    with pytest.raises(ValueError, match=f"{method}: X holds no samples"):
        getattr(net, method)(np.empty((0, 3)), np.empty(0))


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_batch_larger_than_the_data_is_clipped_with_a_warning(deterministic):
    from distnn import Trainer

    X, y = flowers(150)
    net = Network([4, 8, 3], seed=0)
    trainer = Trainer(net, SGD(lr=0.1), epochs=2, deterministic=deterministic)  # batch 256
    with pytest.warns(UserWarning, match="batch_size 256 is more than the 150 training samples"):
        history = trainer.fit(X, y)
    assert trainer.batch_size == 150 and [h["step"] for h in history] == [1, 2]
