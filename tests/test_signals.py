"""A signal at any moment of a 2-rank `distnn train -n 2` run: the job ends within the grace,
with 128+N or with its completion record, and never hangs; `--resume` then finishes the run with
the model an uninterrupted run trains.

The signal goes to the launcher, as a terminal's Ctrl-C or a batch system's SIGTERM does, which
forwards it through mpiexec to every rank; tests/jobs/fault/sitecustomize.py sends it from rank 0
at a chosen point of the run (DISTNN_TEST_SIGNAL=POINT:SIGNAL) and lingers there meanwhile.
"""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distnn import checkpoint
from test_failures import env, model_params, pytestmark  # noqa: F401  (skips without mpiexec)

CONFIG = """
out_dir = "{out}"
[model]
hidden = [16]
family = "multinomial"
[data]
source = "synthetic:classification?n=1000&d=10&k=3&seed=0"
[optim]
name = "adam"
lr = 0.01
[train]
batch_size = 40
epochs = 2
checkpoint_every = 10
watchdog = 20.0
"""  # 800 training rows: 20 steps an epoch, 40 in all
GRACE_S = 30.0  # stopping.STOP_GRACE_S: the job must end within it (and its start-up)
# (point, what the interrupted job leaves: "stopped" exit 128+N | "done" exit 0 with done.json,
# what `--resume` then says)
POINTS = [("start", "stopped", "no checkpoint to resume from"),
          ("data", "stopped", "no checkpoint to resume from"),
          ("step", "stopped", "continuing at epoch 1, step 6"),
          ("checkpoint", "stopped", "continuing at epoch 1, step 12"),
          ("model", "done", "the run had finished (done.json)"),
          ("done", "done", "the run had finished (done.json)")]


def launch(tmp_path, name, *args, point=None, signame=None, after=None):
    """`distnn train CFG -n 2` (with the signal at `point`, or `after` seconds): (exit code,
    stdout, stderr, seconds)."""
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / name))
    pid_file = tmp_path / f"{name}.pid"
    extra = {} if point is None else {"DISTNN_TEST_SIGNAL": f"{point}:{signame}",
                                      "DISTNN_TEST_LAUNCHER_PID": str(pid_file)}
    started = time.monotonic()
    job = subprocess.Popen([sys.executable, "-m", "distnn", "train", str(cfg), "-n", "2", *args],
                           env=env() | extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    pid_file.write_text(str(job.pid))
    if after is not None:
        time.sleep(after)
        job.send_signal(getattr(signal, signame))
    try:
        out, err = job.communicate(timeout=GRACE_S + 60)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the job hung after {signame} at {point}") from None
    return job.returncode, out, err, time.monotonic() - started


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    code, _, err, _ = launch(tmp_path, "run")
    assert code == 0, err
    return model_params(tmp_path / "run")


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point, outcome, resuming", POINTS)
def test_a_signal_at_any_point_ends_the_job_and_resume_trains_the_same_model(
        tmp_path, uninterrupted, point, outcome, resuming, signame):
    code, _, err, seconds = launch(tmp_path, "run", point=point, signame=signame)
    run = tmp_path / "run"
    if outcome == "stopped":
        assert code == 128 + getattr(signal, signame), err
        assert f"stopped by {signame}" in err and "Traceback" not in err, err
        assert not (run / "done.json").exists()
    else:
        assert code == 0, err
        assert json.loads((run / "done.json").read_text())["epochs"] == 2
        assert f"{signame} came after the last step; the run finished" in err
    assert "BAD TERMINATION" not in err and "distnn: watchdog" not in err, err
    assert seconds < GRACE_S + 30
    code, out, err, _ = launch(tmp_path, "run", "--resume")
    assert code == 0, err
    assert resuming in out
    np.testing.assert_array_equal(model_params(run), uninterrupted)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def test_a_signal_before_training_leaves_no_directory_behind(tmp_path):
    code, _, err, _ = launch(tmp_path, "run", point="data", signame="SIGINT")
    assert code == 128 + signal.SIGINT, err
    assert "nothing was trained or written" in err
    assert not (tmp_path / "run").exists()


def test_a_signal_during_a_checkpoint_stops_at_the_next_step_with_its_own_checkpoint(tmp_path):
    code, _, err, _ = launch(tmp_path, "run", point="checkpoint", signame="SIGTERM")
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at epoch 1, step 11" in err
    latest = checkpoint.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.load(latest)[1]["progress"]["step"] == 11


@pytest.mark.parametrize("after, signame", [(0.5, "SIGINT"), (1.5, "SIGTERM"), (2.0, "SIGINT"),
                                            (2.5, "SIGTERM"), (3.0, "SIGINT"), (4.0, "SIGTERM")])
def test_a_signal_at_a_moment_nobody_chose_ends_the_job_and_resume_trains_the_same_model(
        tmp_path, uninterrupted, after, signame):
    # from the launcher's start (its first line holds the signal) through set-up, training and
    # the finish, on this machine's timing; 0.5 s leaves the interpreter time to reach that line
    code, _, err, _ = launch(tmp_path, "run", signame=signame, after=after)
    run = tmp_path / "run"
    assert code in (0, 128 + getattr(signal, signame)), err
    assert (code == 0) == (run / "done.json").exists(), err
    assert "Traceback" not in err and "BAD TERMINATION" not in err, err
    code, _, err, _ = launch(tmp_path, "run", "--resume")
    assert code == 0, err
    np.testing.assert_array_equal(model_params(run), uninterrupted)
