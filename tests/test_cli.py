"""The `distnn` command line end to end, and the model file behind evaluate/predict/info.

Commands run as `python -m distnn ...` subprocesses in a temporary directory, each with a time limit.
The `-n 2` tests start their own mpiexec, so this module is skipped inside an MPI job: run it under
plain pytest. The model tests at the end compare Model.scores with scikit-learn's metrics.
"""
import hashlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from distnn import checkpoint, cli, data, progress
from distnn.checkpoint import CheckpointError
from distnn.config import load_config
from distnn.model import load_model, save_model
from distnn.network import Network

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
    assert np.array_equal(probabilities, model.mean(X[val]))  # every bit, through text
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
    said, first_epoch = resumed.stdout.splitlines()[:2]
    assert said.endswith("ckpt-000000004.npz: continuing at epoch 3, step 5")
    assert first_epoch.startswith("epoch 3/4")  # no epoch trained twice
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
    assert "no checkpoint was written before it" in done.stderr  # and it does not claim one
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


def long_two_rank_run(work, stdout=subprocess.PIPE):
    """`distnn train -n 2` of a run far too long to finish, once its first epoch is recorded."""
    cmd = [sys.executable, "-m", "distnn", "train", "cfg.toml", "-n", "2",
           "--set", "train.epochs=100000", "--set", "train.batch_size=8"]
    job = subprocess.Popen(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)},
                           stdout=stdout, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (work / "run" / "metrics.jsonl").is_file() or not records(work / "run"):
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    return job


@needs_mpiexec
def test_sigterm_to_the_launcher_checkpoints_and_exits_143_then_resume_finishes(work):
    job = long_two_rank_run(work)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGTERM, err
    said = [line for line in err.splitlines() if line.startswith("distnn:")]
    assert len(said) == 2 and "stopped by SIGTERM" in said[0], err
    assert said[1] == ("distnn: continue with: distnn train cfg.toml --out run --resume "
                       "--set=train.epochs=100000 --set=train.batch_size=8 -n 2")  # as started
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
    "NUL after a number": (("flowers.csv", "nul.csv"),
                           "nul.csv line 3, column 'c': control character '\\x00' in '2.0\\x00'"),
    "target for another family": (('"multinomial"', '"bernoulli"'),
                                  "flowers.csv: target 'species' has 3 labels ['setosa', "
                                  "'versicolor', 'virginica']; bernoulli takes two"),
    "label unknown to the model": (("[optim]", 'test_source = "tulips.csv"\n[optim]'),
                                   "label 'tulip' at row 0 is not one of the model's classes"),
    "nested too deeply": (("hidden = [8]", "hidden = " + "[" * 3000 + "]" * 3000),
                          "cfg.toml: invalid TOML: nested too deeply"),
    "inline tables nested too deeply": (("hidden = [8]", "hidden = " + "{a = " * 600 + "1" + "}" * 600),
                                        "cfg.toml: invalid TOML: nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_input_is_one_line_and_exit_code_2_and_nothing_written(work, case):
    (old, new), message = BAD_CONFIGS[case]
    (work / "ragged.csv").write_text("a,b,c,d,species\n1,2,3,4,x\n1,2,3,y\n")
    (work / "nan.csv").write_text("a,b,c,d,species\n1,2,3,4,x\n1,2,nan,4,y\n")
    (work / "nul.csv").write_text("a,b,c,d,species\n1,2,3,4,x\n1,2,2.0\x00,4,y\n")
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
    (["evaluate", "nothing.npz", "flowers.csv"], "nothing.npz: no such model file"),
    (["info", "flowers.csv"], "not a zip/npz archive"),
])
def test_command_errors_are_one_line_and_exit_code_2(work, args, message):
    assert message in one_error_line(distnn(work, *args))


@needs_mpiexec
def test_a_data_error_under_two_ranks_is_said_once(work):
    line = one_error_line(distnn(work, "train", "cfg.toml", "-n", "2", "--set", "data.source=nope.csv"))
    assert line == "distnn: error: no such data file: nope.csv"


BAD_FLAGS = {  # argv: the one line it gets (after "distnn: error: ")
    "": "the following arguments are required: COMMAND (see distnn --help)",
    "bogus": "argument COMMAND: invalid choice: 'bogus' (choose from",
    "train": "train: the following arguments are required: config (see distnn train --help)",
    "train c.toml -n 0": "train: argument -n/--np: expected a number >= 1, got 0 "
                         "(see distnn train --help)",
    "train c.toml -n x": "train: argument -n/--np: expected a whole number, got 'x'",
    "train c.toml -n": "train: argument -n/--np: expected one argument",
    "train c.toml --threads -1": "train: argument --threads: expected a number >= 0, got -1",
    "train c.toml --nope": "train: unrecognized arguments: --nope (see distnn train --help)",
    "train c.toml --set": "train: argument --set: expected one argument",
    "train c.toml --epochs 5": "train: unrecognized arguments: --epochs 5; to set train.epochs, use "
                               "--set train.epochs=5 (see distnn train --help)",
    "train c.toml --lr=0.1": "train: unrecognized arguments: --lr=0.1; to set optim.lr, use --set "
                             "optim.lr=0.1",
    "train c.toml --learning-rate 0.1": "train: unrecognized arguments: --learning-rate 0.1; to set "
                                        "optim.lr, use --set optim.lr=0.1",
    "train c.toml --set optim.lr 0.1": "train: unrecognized arguments: 0.1; --set takes KEY=VALUE as "
                                       "one word: --set optim.lr=0.1",
    "train c.toml --set optim.lr -0.1": "train: unrecognized arguments: -0.1; --set takes KEY=VALUE "
                                        "as one word: --set optim.lr=-0.1",
    "train c.toml --dropout 0.5": "train: unrecognized arguments: --dropout 0.5; distnn has no dropout",
    "train c.toml -np 0": "train: argument -n/--np: expected a number >= 1, got 0",  # mpirun's -np
    "train c.toml --resume --overwrite": "train: argument --overwrite: not allowed with argument "
                                        "--resume",
    "info": "info: the following arguments are required: model (see distnn info --help)",
    "info m.npz extra": "info: unrecognized arguments: extra",
    "evaluate": "evaluate: the following arguments are required: model (see",
    "evaluate m.npz --split test": "evaluate: argument --split: invalid choice: 'test'",
    "predict m.npz d.csv": "predict: the following arguments are required: -o/--output",
    "plot": "plot: the following arguments are required: run_dir",
    "bench --nope": "bench: unrecognized arguments: --nope (see distnn bench --help)",
    "bench --ranks 0": "bench: argument --ranks: rank counts must be >= 1, got '0'",
    "bench --repeat x": "bench: argument --repeat: invalid int value: 'x'",
}


@pytest.mark.parametrize("argv", sorted(BAD_FLAGS))
def test_bad_flags_are_one_line_and_exit_code_2_without_the_usage_block(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv.split())
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage" not in err, err
    assert err.startswith("distnn: error: " + BAD_FLAGS[argv]), err


def test_version_is_the_installed_distributions(capsys, tmp_path):
    import importlib.metadata

    import distnn

    installed = importlib.metadata.version("distnn")
    assert distnn.__version__ == installed
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"distnn {installed}\n"
    # asking for it keeps `import distnn` free of numpy (and of mpi4py, which starts MPI)
    check = "import sys, distnn; distnn.__version__; print(sorted({'numpy', 'mpi4py'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(REPO)}).stdout == "[]\n"


def test_version_of_a_checkout_that_was_never_installed(monkeypatch):
    import importlib.metadata

    import distnn

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert distnn.__version__ == "0+unknown"


def test_mpiruns_np_spelling_is_taken_as_n(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args: args.np)
    assert cli.main(["train", "c.toml", "-np", "2"]) == 2
    assert cli.main(["train", "c.toml", "--set", "data.source=-np", "-n", "3"]) == 3


@pytest.mark.parametrize("argv", ["train c.toml -n 0", "bench --nope", "info"])
def test_a_bad_flag_is_one_line_from_the_command_too(tmp_path, argv):
    assert BAD_FLAGS[argv] in one_error_line(distnn(tmp_path, *argv.split()))


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["info", "-h"]])
def test_help_still_prints_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: distnn")


@pytest.mark.parametrize("command", [["evaluate"], ["predict", "-o", "p.csv"]])
def test_data_with_other_features_than_the_model_is_named_before_its_labels(tmp_path, command):
    save_model(Network([10, 4, 3], seed=1), tmp_path / "m.npz", classes=["a", "b", "c"])
    data = "synthetic:classification?n=50&d=64&k=5"  # labels 0..4: none is the model's
    line = one_error_line(distnn(tmp_path, command[0], "m.npz", data, *command[1:]))
    assert f"{data}: 64 features, but the model m.npz takes 10" in line


def test_model_commands_refuse_a_training_checkpoint(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    ckpt = next((work / "run" / "checkpoints").glob("ckpt-*.npz"))
    assert "a training checkpoint; expected a model" in one_error_line(distnn(work, "info", ckpt))
    np.savez(work / "three.npz", X=np.zeros((4, 3)), y=CLASSES[[0, 1, 2, 0]])
    line = one_error_line(distnn(work, "evaluate", "run/model.npz", "three.npz", "--target", "y"))
    assert "three.npz: 3 features, but the model run/model.npz takes 4 (a, b, c, d)" in line
    info = distnn(work, "info", "run/model.npz").stdout
    assert "4 -> 8 -> 3" in info and "setosa, versicolor, virginica" in info
    assert distnn(work, "plot", "run", "-o", "again.png").returncode == 0
    assert (work / "again.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_of_a_run_scores_its_held_out_rows_and_says_which_rows_it_scored(work):
    assert distnn(work, "train", "cfg.toml").returncode == 0
    val_scores = json.loads((work / "run" / "done.json").read_text())["val"]
    for given in ("run", "run/model.npz"):  # the run directory or its model: the run's own data
        done = distnn(work, "evaluate", given, "--json")
        scores = json.loads(done.stdout)
        assert {k: scores[k] for k in val_scores} == val_scores  # the rows the run held out
        assert [scores[k] for k in ("split", "rows", "source_rows", "trained_rows")] == ["val", 30, 120, 0]
        assert done.stderr == "scored: val split, 30 of 120 rows of flowers.csv (held out from training)\n"

    # --split train: the rows data.train_val_split gave the run, as the model scores them
    X, y = flowers()
    train, _ = data.train_val_split(len(X), 0.25, seed=5)
    done = distnn(work, "evaluate", "run", "--split", "train", "--json")
    assert json.loads(done.stdout)["loss"] == load_model(work / "run" / "model.npz").scores(
        X[train], y[train])["loss"]
    assert "train split, 90 of 120 rows of flowers.csv (the rows the model trained on)" in done.stderr

    # DATA that is the run's source: all its rows, as before, saying the model trained on most
    done = distnn(work, "evaluate", "run", "./flowers.csv")
    assert done.stdout == distnn(work, "evaluate", "run", "--split", "all").stdout
    assert ("scored: all 120 rows of ./flowers.csv, including the 90 the model trained on "
            "(--split val scores the 30 held out)") in done.stderr

    # other data: all its rows, said so; the run's split does not apply to it
    shutil.copy(work / "flowers.csv", work / "copy.csv")
    done = distnn(work, "evaluate", "run", "copy.csv", "--json")
    assert json.loads(done.stdout)["split"] == "all"
    assert "all 120 rows of copy.csv (not the run's data source flowers.csv" in done.stderr
    line = one_error_line(distnn(work, "evaluate", "run", "copy.csv", "--split", "val"))
    assert "--split val: copy.csv is not the run's data source flowers.csv" in line


def test_evaluate_without_held_out_rows_or_a_run_config_says_so(work):
    assert distnn(work, "train", "cfg.toml", "--set", "data.val_fraction=0").returncode == 0
    done = distnn(work, "evaluate", "run")
    assert done.returncode == 0, done.stderr
    assert "all 120 rows of flowers.csv, all of which the model trained on" in done.stderr
    line = one_error_line(distnn(work, "evaluate", "run", "--split", "val"))
    assert "--split val: the run held out no rows (data.val_fraction = 0)" in line
    save_model(Network([4, 3], seed=1), work / "bare.npz", classes=list(CLASSES))  # no run's config
    assert "give the DATA to score" in one_error_line(distnn(work, "evaluate", "bare.npz"))
    done = distnn(work, "evaluate", "bare.npz", "flowers.csv", "--target", "species")
    assert "all 120 rows of flowers.csv (the model keeps no config" in done.stderr
    for forged, message in (("cfg", "model field 'config' is str"),
                            ({"model": {"hidden": "x"}}, "model field 'config' is not a valid config")):
        save_model(Network([4, 3], seed=1), work / "forged.npz", classes=list(CLASSES),
                   meta={"config": forged})
        assert message in one_error_line(distnn(work, "evaluate", "forged.npz"))


def test_a_run_directory_stands_for_its_model_and_errors_say_model_file(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    info = distnn(work, "info", "run")
    assert info.returncode == 0 and info.stdout == distnn(work, "info", "run/model.npz").stdout
    assert distnn(work, "predict", "run", "flowers.csv", "-o", "p.csv").returncode == 0
    assert (work / "p.csv").read_text().startswith("p_setosa,")
    line = one_error_line(distnn(work, "info", "nothing.npz"))
    assert line.endswith("nothing.npz: no such model file")
    (work / "empty").mkdir()
    line = one_error_line(distnn(work, "evaluate", "empty", "flowers.csv"))
    assert "empty: a directory without a model file (model.npz)" in line
    with zipfile.ZipFile(work / "junk.npz", "w") as z:  # an .npy member with a broken header
        z.writestr("params.npy", b"\x93NUMPY\x01\x00junk")
    for name in ("nothing.npz", "junk.npz"):
        with pytest.raises(CheckpointError, match="model file"):
            load_model(work / name)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):  # real checkpoints keep theirs
        checkpoint.load(work / "nothing.npz")


def test_the_curves_say_the_training_loss_includes_the_penalty_and_the_val_loss_does_not(
        work, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn = []  # the legend labels of each figure drawn, in order
    figure = progress.curves_figure

    def recorded(*args, **kwargs):
        fig = figure(*args, **kwargs)
        drawn.append([t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()])
        return fig

    monkeypatch.setattr(progress, "curves_figure", recorded)
    monkeypatch.chdir(work)
    for l2, out in ((1e-3, "pen"), (0.0, "plain")):
        assert cli.main(["train", "cfg.toml", "--set", "train.epochs=1", "--set", f"model.l2={l2}",
                         "--out", out]) == 0  # curves.png at the end of the run
        assert cli.main(["plot", out]) == 0  # and again from the run's config.toml
    accuracies = ["train accuracy", "val accuracy"]
    penalized = ["train loss (incl. L2 penalty)", "val loss (no penalty)", *accuracies]
    plain = ["train loss", "val loss", *accuracies]
    assert drawn == [penalized, penalized, plain, plain]
    assert progress.penalty(1e-4, 0.0) == "L1" and progress.penalty(1e-4, 1e-4) == "L1 + L2"


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
        save_model(net, tmp_path / "m.npz", meta={"features": ["a", "b", "c"]})
        model = load_model(tmp_path / "m.npz")
        mean = model.mean(X)[:, 0]
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


# --------------------------------------------------------------- what a failed run leaves behind

def fake_mpiexec(work, exit_code):
    """An "mpiexec" that runs no rank and exits `exit_code`."""
    fake = work / f"fake-mpiexec-{exit_code}"
    fake.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    fake.chmod(0o755)
    return str(fake)


def run_files(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in Path(run).rglob("*") if p.is_file()}


def test_a_refused_launch_leaves_a_finished_run_finished(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    before = run_files(work / "run")
    refused = distnn(work, "train", "cfg.toml", "-n", "2", "--resume", MPIEXEC=fake_mpiexec(work, 2))
    assert refused.returncode == 2
    assert run_files(work / "run") == before  # done.json still vouches for the finished run


@needs_mpiexec
@pytest.mark.parametrize("spoil", [["--set", "data.source=nope.csv"], ["--resume", "--set", "train.seed=9"]],
                         ids=["bad data source", "refused resume"])
def test_a_refused_two_rank_run_leaves_a_finished_run_finished(work, spoil):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    before = run_files(work / "run")
    one_error_line(distnn(work, "train", "cfg.toml", "-n", "2", *spoil))
    assert run_files(work / "run") == before


def test_a_fresh_run_into_a_finished_run_is_refused_unless_told_to_overwrite(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    before = run_files(work / "run")
    line = one_error_line(distnn(work, "train", "cfg.toml", "--set", "optim.lr=1e308"))
    assert "run: holds a finished run" in line and "--resume" in line and "--overwrite" in line
    assert run_files(work / "run") == before
    done = distnn(work, "train", "cfg.toml", "--set", "train.epochs=2", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in records(work / "run")] == [1, 2]


def test_a_fresh_run_into_a_checkpointed_run_is_refused(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    (work / "run" / "done.json").unlink()
    (work / "run" / "model.npz").unlink()  # an interrupted run: only its checkpoints
    line = one_error_line(distnn(work, "train", "cfg.toml"))
    assert "run: holds checkpoints of an unfinished run" in line


def test_a_fresh_run_may_replace_a_run_that_left_nothing_to_resume(work):
    (work / "run").mkdir()
    (work / "run" / "metrics.jsonl").write_text("")  # a run that failed before its first checkpoint
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0


def truncate_checkpoints(run):
    for p in (Path(run) / "checkpoints").glob("ckpt-*.npz"):
        p.write_bytes(p.read_bytes()[:500])


def test_resume_refuses_when_no_checkpoint_loads(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=3").returncode == 0
    (work / "run" / "done.json").unlink()
    truncate_checkpoints(work / "run")
    before = run_files(work / "run")
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume"))
    assert "run/checkpoints: none of the 3 checkpoints loads" in line
    assert "ckpt-000000006.npz" in line  # the newest, and why it failed
    assert run_files(work / "run") == before


def test_resume_skips_a_model_file_among_the_checkpoints(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    forged = work / "run" / "checkpoints" / "ckpt-000000099.npz"
    shutil.copy(work / "run" / "model.npz", forged)
    done = distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=2")
    assert done.returncode == 0, done.stderr
    assert "ckpt-000000099.npz: not a training checkpoint" in done.stderr
    for p in (work / "run" / "checkpoints").glob("ckpt-*.npz"):
        if p != forged:
            p.unlink()
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=3"))
    assert "none of the 1 checkpoints loads" in line and "not a training checkpoint" in line


@pytest.mark.parametrize("change, what", [
    (lambda X, y: (X[:-1], y[:-1]), "rows 120 there, 119 here"),
    (lambda X, y: (X, np.where(y == "setosa", "rose", y)), "classes"),
    (lambda X, y: (X + 1e-3, y), "content"),
])
def test_resume_refuses_training_data_that_changed(work, change, what):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    write_csv(work / "flowers.csv", *change(*flowers()))
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=2"))
    assert "flowers.csv: the training data changed since the run started" in line and what in line


# ------------------------------------------------------------------------------- class labels

@pytest.mark.parametrize("cell, what", [("nan", "NaN"), ("inf", "inf"), ("-inf", "-inf")])
def test_a_non_finite_class_label_is_refused_naming_the_row(work, cell, what):
    X, y = flowers()
    labels = np.searchsorted(CLASSES, y).astype(str)
    labels[7] = cell
    write_csv(work / "flowers.csv", X, labels)
    line = one_error_line(distnn(work, "train", "cfg.toml"))
    assert f"flowers.csv: target 'species' row 7 is {what}" in line


def numeric_labels_model(work, labels):
    """A model trained on flowers with class labels `labels` (an array of 3) in an npz."""
    X, y = flowers()
    codes = np.searchsorted(CLASSES, y)
    np.savez(work / "train.npz", X=X, y=labels[codes])
    assert distnn(work, "train", "cfg.toml", "--set", "data.source=train.npz", "--set", "data.target=y",
                  "--set", "train.epochs=1").returncode == 0
    return X, codes


@pytest.mark.parametrize("trained, scored", [(np.array([0, 1, 2]), np.array([0.0, 1.0, 2.0])),
                                             (np.array([0.0, 1.0, 2.0]), np.array([0, 1, 2]))],
                         ids=["int model, float data", "float model, int data"])
def test_numeric_labels_compare_as_numbers(work, trained, scored):
    X, codes = numeric_labels_model(work, trained)
    np.savez(work / "score.npz", X=X, y=scored[codes])
    done = distnn(work, "evaluate", "run/model.npz", "score.npz")
    assert done.returncode == 0, done.stderr
    assert distnn(work, "train", "cfg.toml", "--overwrite", "--set", "data.source=train.npz",
                  "--set", "data.target=y", "--set", "train.epochs=1",
                  "--set", "data.test_source=score.npz").returncode == 0
    np.savez(work / "text.npz", X=X, y=CLASSES[codes])
    line = one_error_line(distnn(work, "evaluate", "run/model.npz", "text.npz"))
    assert "label 'setosa' at row 3 is not one of the model's classes" in line  # text is no number


# ------------------------------------------------------------------------------- the launcher

@needs_mpiexec
def test_sighup_to_the_launcher_stops_every_rank_with_a_checkpoint(work):
    job = long_two_rank_run(work, stdout=subprocess.DEVNULL)
    job.send_signal(signal.SIGHUP)
    _, err = job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert list((work / "run" / "checkpoints").glob("ckpt-*.npz"))
    left = subprocess.run(["pgrep", "-f", f"distnn train cfg.toml"], capture_output=True, text=True)
    assert not [p for p in left.stdout.split() if Path(f"/proc/{p}/cwd").resolve() == work.resolve()]


@pytest.mark.parametrize("flag, value", [("-n", "99999999999999999999"), ("-n", "4294967298"),
                                         ("-n", "65537"), ("--threads", str(10**30))])
def test_counts_are_bounded(flag, value, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "c.toml", flag, value])
    assert exit.value.code == 2
    assert "expected a number <=" in capsys.readouterr().err


# ------------------------------------------------------------------------------- predict output

def test_predict_replaces_its_output_only_when_complete(work, monkeypatch, capsys):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    (work / "pred.csv").write_text("keep me\n")
    real_writer = cli.csv.writer

    def disk_full_after_a_row(f):
        out = real_writer(f)

        class Full:
            def writerow(self, row):
                if getattr(self, "rows", 0) == 2:
                    raise OSError(28, "No space left on device")
                self.rows = getattr(self, "rows", 0) + 1
                out.writerow(row)
        return Full()

    monkeypatch.chdir(work)
    monkeypatch.setattr(cli.csv, "writer", disk_full_after_a_row)
    assert cli.main(["predict", "run/model.npz", "flowers.csv", "-o", "pred.csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distnn: error: pred.csv: cannot write") and "No space left" in err
    assert (work / "pred.csv").read_text() == "keep me\n"
    assert sorted(p.name for p in work.iterdir() if "pred" in p.name) == ["pred.csv"]


def test_predict_writes_through_a_link_or_into_a_fifo_instead_of_replacing_it(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    (work / "real.csv").write_text("old\n")
    (work / "link.csv").symlink_to("real.csv")
    assert distnn(work, "predict", "run/model.npz", "flowers.csv", "-o", "link.csv").returncode == 0
    assert (work / "link.csv").is_symlink() and (work / "real.csv").read_text().startswith("p_")
    os.mkfifo(work / "fifo.csv")
    reader = subprocess.Popen(["cat", str(work / "fifo.csv")], stdout=subprocess.PIPE, text=True)
    assert distnn(work, "predict", "run/model.npz", "flowers.csv", "-o", "fifo.csv").returncode == 0
    assert reader.communicate(timeout=30)[0].startswith("p_")
    assert stat.S_ISFIFO(os.stat(work / "fifo.csv").st_mode)


def test_resume_refuses_a_data_fingerprint_that_is_not_one(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    (work / "run" / "data.json").write_text("null\n")
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=2"))
    assert "data.json: not a data fingerprint" in line


def test_resume_of_a_finished_run_without_checkpoints_says_there_is_nothing_to_resume(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    shutil.rmtree(work / "run" / "checkpoints")
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=2"))
    assert "no checkpoint to resume from" in line and "--overwrite" in line


# -------------------------------------------------------------------------- test_source features

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["npz", "compressed npz"])
def test_a_test_source_with_other_features_is_refused(work, save):
    X, y = flowers()
    save(work / "train.npz", X=X, y=np.searchsorted(CLASSES, y))
    save(work / "wide.npz", X=np.hstack([X, X[:, :1]]), y=np.searchsorted(CLASSES, y))
    line = one_error_line(distnn(work, "train", "cfg.toml", "--set", "data.source=train.npz",
                                 "--set", "data.target=y", "--set", "data.test_source=wide.npz"))
    assert "wide.npz: 5 features, but the training data train.npz has 4" in line
    assert not (work / "run").exists()


# ------------------------------------------------------------------------ one line, not a traceback

@pytest.mark.parametrize("args, message", [
    (["--set", "model.hidden=[100000000000]"], "model.hidden: a 4-100000000000-3 network needs"),
    (["--set", "model.hidden=[1000000000000, 1000000000000]"],  # past what numpy can shape
     "model.hidden: a 4-1000000000000-1000000000000-3 network needs 3,725,290,298,495,441.5 GiB "
     "(float32) for its 1,000,000,000,009,000,000,000,003 parameters alone"),
    (["--set", "data.source=synthetic:classification?n=100000000000"],
     "synthetic:classification?n=100000000000: n=100000000000 rows of d=10 features need"),
    (["--set", "data.source=synthetic:classification?n=100&k=1000000000000"],
     "synthetic:classification?n=100&k=1000000000000: parameter 'k' expected <= 65536, "
     "got 1000000000000"),
    (["--set", "data.source=synthetic:regression?n=1000000000000&d=1000000000000"],  # numpy's limit
     "n=1000000000000 rows of d=1000000000000 features need 7,450,580,596,923,828.0 GiB"),
    (["--set", "train.threads=100000"], "train.threads: expected a value in [0, 4096]"),
    (["--set", "train.bucket_mb=1e-9"], "train.bucket_mb: expected a value in [1e-05, 4096]"),
    (["--set", "=5"], "override '=5': no key before '='"),
    (["--set", "model.hidden=" + "[" * 3000 + "]" * 3000],
     "model.hidden: the --set value is invalid TOML: nested too deeply"),
])
def test_settings_that_cannot_work_are_one_line(work, args, message):
    assert message in one_error_line(distnn(work, "train", "cfg.toml", *args))
    assert not (work / "run").exists()


@pytest.mark.parametrize("ranks", [[], pytest.param(["-n", "2"], marks=needs_mpiexec)],
                         ids=["1 rank", "2 ranks"])
def test_training_with_stdout_closed_works(work, ranks):
    command = shlex.join([sys.executable, "-m", "distnn", "train", "cfg.toml", *ranks])
    done = subprocess.run(f"{command} >&-", shell=True,
                          cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=False,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (work / "run" / "done.json").is_file()


@pytest.mark.parametrize("line", ["[1, 2]", "NaN", '{"loss": 1.0}', '{"epoch": 1, "loss": "low"}'])
def test_plot_refuses_a_metrics_line_that_is_not_an_epoch_record(work, line):
    (work / "r").mkdir()
    (work / "r" / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n' + line + "\n")
    assert "r/metrics.jsonl line 2: not an epoch record" in one_error_line(distnn(work, "plot", "r"))


@pytest.mark.parametrize("metrics", [{"val": [1, 2]}, {"val": {"loss": "low"}}, {"test": 3}])
def test_info_refuses_metrics_that_are_not_tables_of_numbers(tmp_path, metrics):
    from distnn import Network

    save_model(Network([3, 4, 1], family="gaussian"), tmp_path / "m.npz", meta={"metrics": metrics})
    assert "model field 'metrics'" in one_error_line(distnn(tmp_path, "info", "m.npz"))


def test_an_out_dir_that_is_a_file_is_named(work):
    (work / "afile").write_text("")
    line = one_error_line(distnn(work, "train", "cfg.toml", "--out", "afile"))
    assert "--out afile: is a file, not a directory" in line
    line = one_error_line(distnn(work, "train", "cfg.toml", "--out", "afile/sub"))
    assert "--out afile/sub: afile is a file, not a directory" in line


# ------------------------------------------------------------- the run directory is the run's own

@pytest.mark.parametrize("ranks", [[], pytest.param(["-n", "2"], marks=needs_mpiexec)],
                         ids=["1 rank", "2 ranks"])
def test_a_run_into_a_directory_another_run_is_training_into_is_refused(work, ranks):
    import fcntl

    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    before = run_files(work / "run")
    with open(work / "run" / ".lock", "a") as held:  # as the other run's rank 0 holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        line = one_error_line(distnn(work, "train", "cfg.toml", "--overwrite", *ranks))
    assert "another run is training into run" in line
    assert run_files(work / "run") == before
    done = distnn(work, "train", "cfg.toml", "--overwrite", "--set", "train.epochs=1")
    assert done.returncode == 0, done.stderr


def test_a_killed_launcher_takes_its_mpiexec_down(work):
    fake = work / "fake-mpiexec"
    fake.write_text(f"#!/bin/sh\ntrap 'touch {work}/stopped; exit 143' TERM\ntouch {work}/started\n"
                    f"while :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    launcher = subprocess.Popen([sys.executable, "-m", "distnn", "train", "cfg.toml", "-n", "2"],
                                cwd=work,
                                env=os.environ | {"PYTHONPATH": str(REPO), "MPIEXEC": str(fake)})
    deadline = time.monotonic() + 30
    while not (work / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.kill()  # SIGKILL: no handler forwards anything
    launcher.wait()
    while not (work / "stopped").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (work / "stopped").exists()


@pytest.mark.parametrize("output", ["run/model.npz", "flowers.csv", "model-link.npz",
                                    "run/data.json", "run/checkpoints/p.csv"])
def test_predict_refuses_to_overwrite_its_input_or_a_run_file(work, output):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    (work / "model-link.npz").symlink_to("run/model.npz")
    before = run_files(work)
    line = one_error_line(distnn(work, "predict", "run/model.npz", "flowers.csv", "-o", output))
    assert f"-o {output}" in line
    assert run_files(work) == before


@pytest.mark.parametrize("users", [["config.toml", "metrics.jsonl"], ["metrics.jsonl"]])
def test_a_fresh_run_does_not_replace_the_users_own_files_without_overwrite(work, users):
    for name in users:
        (work / name).write_text("# my own, with comments\n")
    before = run_files(work)
    line = one_error_line(distnn(work, "train", "cfg.toml", "--out", "."))
    assert f"error: {users[0]}: a fresh run would replace it" in line and "--overwrite" in line
    assert run_files(work) | {".lock": b""} == before | {".lock": b""}  # the lock file may stay


def test_a_fresh_run_may_replace_a_run_that_failed_before_its_first_checkpoint(work):
    assert distnn(work, "train", "cfg.toml", "--set", "optim.lr=1e300").returncode == 1  # diverges
    assert {"config.toml", "data.json"} <= {p.name for p in (work / "run").iterdir()}
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0


@pytest.mark.parametrize("name", ["data.json", "config.toml"])
@pytest.mark.parametrize("spoil", ["missing", "fifo"])
def test_resume_refuses_without_the_files_it_checks_against(work, name, spoil):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    (work / "run" / name).unlink()
    if spoil == "fifo":
        os.mkfifo(work / "run" / name)  # reading it would block
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=2",
                                 timeout=30))
    assert f"run/{name}" in line and "--overwrite" in line


def test_resume_refuses_a_deeply_nested_data_fingerprint_in_one_line(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    (work / "run" / "data.json").write_text("[" * 100000)
    line = one_error_line(distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=2"))
    assert "data.json: unreadable data fingerprint" in line


def forge_meta(path, meta_json):
    """A model file whose checksum is right but whose meta JSON distnn would never write."""
    save_model(Network([3, 4, 3], seed=1), path, classes=[0, 1, 2])
    arrays, _ = checkpoint.load(path)
    members = arrays | {name: np.frombuffer(blob, np.uint8) for name, blob in (
        ("__format__", checkpoint.FORMAT.encode()), ("__meta__", meta_json),
        ("__sha256__", checkpoint._digest(arrays, meta_json).encode()))}
    with open(path, "wb") as f:
        checkpoint._write_npz(f, members)


@pytest.mark.parametrize("command", [["info"], ["evaluate", "flowers.csv"]])
def test_a_model_file_with_deeply_nested_meta_is_refused_in_one_line(work, command):
    forge_meta(work / "model.npz", b'{"kind": "model", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    line = one_error_line(distnn(work, command[0], "model.npz", *command[1:]))
    assert "model.npz: __meta__ is JSON nested too deeply" in line


@pytest.mark.parametrize("name", ["data.json", "config.toml"])
def test_a_run_replaces_a_link_or_fifo_in_its_directory_instead_of_writing_through_it(work, name):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    (work / "victim.txt").write_text("not yours\n")
    (work / "run" / name).unlink()
    (work / "run" / name).symlink_to(work / "victim.txt")
    done = distnn(work, "train", "cfg.toml", "--overwrite", "--set", "train.epochs=1")
    assert done.returncode == 0, done.stderr
    assert (work / "victim.txt").read_text() == "not yours\n"
    (work / "run" / name).unlink()
    os.mkfifo(work / "run" / name)
    done = distnn(work, "train", "cfg.toml", "--overwrite", "--set", "train.epochs=1", timeout=30)
    assert done.returncode == 0, done.stderr
    assert (work / "run" / name).is_file() and not (work / "run" / name).is_symlink()


def test_a_checkpoints_path_that_is_a_file_is_refused_before_anything_is_replaced(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    shutil.rmtree(work / "run" / "checkpoints")
    (work / "run" / "checkpoints").write_text("")
    before = run_files(work / "run")
    line = one_error_line(distnn(work, "train", "cfg.toml", "--overwrite"))
    assert "run/checkpoints: is a file, not a directory" in line
    assert run_files(work / "run") == before


def test_a_run_removes_the_temp_files_a_killed_run_left_and_nothing_else(work):
    assert distnn(work, "train", "cfg.toml", "--set", "train.epochs=1").returncode == 0
    run = work / "run"
    stale = [run / ".config.toml.4242.tmp", run / ".model.npz.4242.0badf00d.tmp",
             run / "checkpoints" / ".ckpt-000000002.npz.4242.0badf00d.tmp"]
    kept = [run / ".notes.txt.4242.tmp", run / "notes.4242.tmp",
            run / "checkpoints" / ".mine.npz.4242.0badf00d.tmp"]
    for p in stale + kept:
        p.write_text("x")
    assert distnn(work, "train", "cfg.toml", "--resume", "--set", "train.epochs=2").returncode == 0
    assert [p.exists() for p in stale + kept] == [False] * len(stale) + [True] * len(kept)


def test_training_in_process_gives_the_signal_handlers_back(work, monkeypatch):
    # `distnn train` keeps its handlers to the process's end; a caller of cli.main keeps its own
    monkeypatch.chdir(work)
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    assert cli.main(["train", "cfg.toml", "--set", "train.epochs=1"]) == 0
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
