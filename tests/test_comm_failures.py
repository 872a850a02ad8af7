"""One rank stalls, raises, exits or dies: the whole mpiexec job must end, promptly and non-zero.

Serial tests that launch small jobs under `mpiexec -n 2` and `-n 3`, each with an outer time limit so
that a hang fails the test instead of hanging the suite. Skipped inside an MPI job (no nested mpiexec).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = next((str(p) for p in (Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec"))
                if p and os.access(p, os.X_OK)), None)
pytestmark = [
    pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec next to the interpreter or on PATH"),
    pytest.mark.skipif("PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ,
                       reason="launches its own mpiexec jobs: run it under plain pytest"),
]
WATCHDOG_S = 1.5  # generous for one small allreduce, short enough for a fast test
BOUND_S = 30  # the whole job: start-up, the watchdog deadline, the tear-down

JOB = """
import os, signal, sys, time
import numpy as np
from distnn.comm import Comm, install_excepthook

mode, timeout = sys.argv[1], None if sys.argv[2] == "none" else float(sys.argv[2])
comm = Comm(timeout=timeout)
install_excepthook(comm)
comm.comm.Barrier()  # no deadline while ranks start up: a loaded machine may start them seconds apart
buf = np.ones(1000)
comm.allreduce(buf, "warm-up")
if comm.rank == comm.size - 1:
    if mode == "stall":
        time.sleep(600)
    elif mode == "raise":
        raise ValueError("row 7 of shard.npy is ragged")
    elif mode == "exit0":
        sys.exit(0)
    elif mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
comm.allreduce(buf, "allreduce of step 1")
print("finished", flush=True)
"""


def run_job(tmp_path, n, mode, timeout):
    """Run JOB under mpiexec -n n; return (completed process, seconds it took)."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    path = [str(REPO), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    start = time.monotonic()
    done = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(script), mode, str(timeout)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BOUND_S * 2)
    return done, time.monotonic() - start


@pytest.mark.parametrize("n", [2, 3])
def test_a_healthy_job_finishes_on_every_rank(tmp_path, n):
    done, _ = run_job(tmp_path, n, "none", WATCHDOG_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("finished") == n


@pytest.mark.parametrize("mode", ["stall", "exit0"])
@pytest.mark.parametrize("n", [2, 3])
def test_watchdog_aborts_when_a_rank_never_arrives(tmp_path, n, mode):
    done, seconds = run_job(tmp_path, n, mode, WATCHDOG_S)
    assert done.returncode == 3, done.stderr  # WATCHDOG_EXIT
    assert seconds < BOUND_S
    assert (f"distnn: watchdog: allreduce of step 1 did not complete within {WATCHDOG_S:g} s on rank "
            in done.stderr)
    assert f"ranks not arrived: [{n - 1}]" in done.stderr
    assert "finished" not in done.stdout


@pytest.mark.parametrize("n", [2, 3])
def test_an_exception_on_one_rank_aborts_the_job(tmp_path, n):
    # no watchdog: the peers wait in a blocking Allreduce, and only the excepthook's abort frees them
    done, seconds = run_job(tmp_path, n, "raise", "none")
    assert done.returncode != 0
    assert seconds < BOUND_S
    assert f"[rank {n - 1}] ValueError: row 7 of shard.npy is ragged" in done.stderr
    assert f"[rank {n - 1}] Traceback (most recent call last):" in done.stderr
    assert "finished" not in done.stdout


@pytest.mark.parametrize("n", [2, 3])
def test_a_killed_rank_brings_the_job_down(tmp_path, n):
    done, seconds = run_job(tmp_path, n, "kill", "none")
    assert done.returncode != 0
    assert seconds < BOUND_S
    assert "finished" not in done.stdout
