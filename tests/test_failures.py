"""What a 2-rank job does when something goes wrong: never hang, never fake success, lose nothing.

Every case runs `distnn train CONFIG -n 2` as a subprocess under a time limit, with a fault
injected on one rank by tests/jobs/fault/sitecustomize.py (DISTNN_TEST_FAULT=MODE:RANK:STEP).
"""

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

from distnn import checkpoint

FAULT_DIR = Path(__file__).parent / "jobs" / "fault"
CONFIG = """
out_dir = "{out}"
[model]
hidden = [16]
family = "multinomial"
[data]
source = "synthetic:classification?n=2000&d=10&k=3&seed=0"
[optim]
name = "adam"
lr = 0.01
[train]
batch_size = 40
epochs = {epochs}
watchdog = 4.0
"""  # 1600 training rows: 40 steps an epoch


def mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


pytestmark = [pytest.mark.skipif(mpiexec() is None, reason="no mpiexec"),
              pytest.mark.skipif("PMI_RANK" in os.environ, reason="launches its own MPI jobs")]


def config(tmp_path, name="run", epochs=3):
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(out=tmp_path / name, epochs=epochs))
    return path


def env(fault=None):
    e = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAULT_DIR),
                                                                   os.environ.get("PYTHONPATH")]))}
    if fault:
        e["DISTNN_TEST_FAULT"] = fault
    return e


def train(cfg, *args, fault=None, limit=90):
    """Run the job; returns (exit code, stderr, seconds). A hang fails the test at `limit`."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "distnn", "train", str(cfg), "-n", "2", *args],
                            env=env(fault), capture_output=True, text=True, timeout=limit)
    return result.returncode, result.stderr, time.monotonic() - started


def model_params(run_dir):
    arrays, _ = checkpoint.load(run_dir / "model.npz")
    return arrays["params"]


def test_an_exception_on_one_rank_brings_every_rank_down(tmp_path):
    code, err, seconds = train(config(tmp_path), fault="raise:1:5")
    assert code != 0 and seconds < 30
    assert "injected failure on rank 1 at step 5" in err
    assert not (tmp_path / "run" / "done.json").exists()


def test_a_killed_rank_brings_every_rank_down(tmp_path):
    code, _, seconds = train(config(tmp_path), fault="kill:1:5")
    assert code != 0 and seconds < 30
    assert not (tmp_path / "run" / "done.json").exists()


def test_a_rank_that_exits_zero_mid_run_is_not_a_success(tmp_path):
    code, err, seconds = train(config(tmp_path), fault="exit0:1:5")
    assert code != 0 and seconds < 30
    assert "watchdog" in err or "completion record" in err
    assert not (tmp_path / "run" / "done.json").exists()


def test_a_stalled_rank_is_ended_by_the_watchdog_which_names_it(tmp_path):
    code, err, seconds = train(config(tmp_path), fault="stall:1:5")
    assert code == 3 and seconds < 40
    assert "watchdog" in err and "ranks not arrived: [1]" in err


@pytest.mark.parametrize("rank, where", [(1, "prepare"), (0, "save_model")])
def test_a_rank_stalled_in_the_set_up_or_the_finish_is_ended_by_the_watchdog(tmp_path, rank, where):
    # every collective from the config's agreement to the completion record has the deadline
    code, err, seconds = train(config(tmp_path, epochs=1), fault=f"stallin:{rank}:{where}")
    assert code == 3, err
    assert f"ranks not arrived: [{rank}]" in err
    assert seconds < 30
    assert not (tmp_path / "run" / "done.json").exists()


def test_a_stop_request_while_a_rank_stalls_ends_the_job_within_the_grace_not_the_watchdog(tmp_path):
    code, err, seconds = train(config(tmp_path), "--set", "train.watchdog=600", fault="stallterm:1:5")
    assert code == 3 and seconds < 30
    assert "within 2 s of the request to stop" in err and "ranks not arrived: [1]" in err


def test_a_stop_request_before_slow_healthy_epoch_end_work_still_stops_with_a_checkpoint(tmp_path):
    # SIGTERM on rank 1 after the epoch's last step; rank 0's epoch-end checkpoint then takes
    # longer than the stop grace, which only the training steps' collectives must respect
    code, err, _ = train(config(tmp_path), "--set", "train.watchdog=600", fault="termslow:1:39")
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "distnn: watchdog" not in err
    assert checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "ckpt-000000041.npz"


@pytest.mark.parametrize("mode", [[], ["--set", "train.deterministic=true", "--set", "train.chunk_size=8"]],
                         ids=["default", "deterministic"])
def test_a_nan_gradient_stops_every_rank_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, mode):
    code, err, _ = train(config(tmp_path), *mode, fault="nan:1:45")
    assert code == 1
    assert "training diverged at epoch 2, step 46" in err and "Traceback" not in err
    saved = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == ["ckpt-000000040.npz"]
    assert f"the last good checkpoint, {saved[0]} (epoch 1, step 40, training loss " in err
    checkpoint.load(saved[0])  # intact


def test_sigterm_on_one_rank_checkpoints_and_resume_is_bit_identical(tmp_path):
    code, err, _ = train(config(tmp_path, "straight"))
    assert code == 0, err
    cfg = config(tmp_path)
    code, err, _ = train(cfg, fault="sigterm:1:50")
    assert code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at epoch 2, step 51" in err
    code, err, _ = train(cfg, "--resume")
    assert code == 0, err
    np.testing.assert_array_equal(model_params(tmp_path / "run"), model_params(tmp_path / "straight"))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]


def test_sigterm_to_the_launcher_stops_the_job_with_a_checkpoint(tmp_path):
    cfg = config(tmp_path, epochs=100000)
    job = subprocess.Popen([sys.executable, "-m", "distnn", "train", str(cfg), "-n", "2"],
                           env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    latest = checkpoint.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest is not None and checkpoint.load(latest)[1]["progress"]["step"] >= 80


def flip_at_parameter_data(path):
    """Offset of a byte inside the stored parameter values (past the zip and .npy headers)."""
    import zipfile

    info = zipfile.ZipFile(path).getinfo("params.npy")
    raw = path.read_bytes()
    name_len, extra_len = (int.from_bytes(raw[info.header_offset + k:info.header_offset + k + 2],
                                          "little") for k in (26, 28))
    return info.header_offset + 30 + name_len + extra_len + 128 + 8


def test_resume_skips_a_corrupted_newest_checkpoint(tmp_path):
    cfg = config(tmp_path, epochs=2)
    assert train(cfg)[0] == 0
    directory = tmp_path / "run" / "checkpoints"
    newest = checkpoint.list_checkpoints(directory)[-1]
    data = bytearray(newest.read_bytes())
    data[flip_at_parameter_data(newest)] ^= 0xFF  # one flipped byte in the saved parameters
    newest.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(newest)
    code, err, _ = train(cfg, "--set", "train.epochs=3", "--resume")
    assert code == 0, err
    assert "ckpt-000000080.npz" in err  # said which checkpoint it could not use
