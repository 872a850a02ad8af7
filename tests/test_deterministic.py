"""Deterministic mode: the same bits for any number of ranks, resumed at any number of ranks.

Each run is a separate job under `mpiexec -n P` with a time limit (tests/jobs/deterministic.py),
so a hang fails the test instead of the suite. 17 cases: every family x float32/float64 x
momentum SGD/Adam, and Adam with gradient clipping, 105 steps, global batches not divisible by P
or by the chunk size.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "jobs" / "deterministic.py"


def mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


pytestmark = [pytest.mark.skipif(mpiexec() is None, reason="no mpiexec"),
              pytest.mark.skipif("PMI_RANK" in os.environ or "PMIX_RANK" in os.environ,
                                 reason="launches its own MPI jobs")]


def run(ranks, out, *args):
    result = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, str(JOB), str(out), *args],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def digests(run_):
    return {k: v for k, v in run_.items() if not k.endswith(":summed in place")}


def test_one_to_four_ranks_give_identical_bits(tmp_path):
    runs = {p: run(p, tmp_path) for p in (1, 2, 3, 4)}
    assert runs[1]["multinomial-float64-adam:steps"] == 105
    for p in (2, 3, 4):
        assert runs[p] == runs[1], f"{p} ranks differ from 1 rank"


def test_summing_in_float64_through_mpi_gives_the_bits_of_shared_memory(tmp_path):
    """Across nodes each rank rounds its chunks into float64 and MPI adds them: the same bits."""
    shared, mpi = run(3, tmp_path), run(3, tmp_path, "--no-shared-memory")
    assert all(shared[k] for k in shared if k.endswith(":summed in place"))
    assert not any(mpi[k] for k in mpi if k.endswith(":summed in place"))
    assert digests(mpi) == digests(shared) == digests(run(1, tmp_path))


def test_resume_at_another_rank_count_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    uninterrupted = run(2, tmp_path / "straight")
    run(3, tmp_path / "saved", "--save-at", "40")  # writes ckpt-000000040.npz for every case
    resumed = run(2, tmp_path / "resumed", "--save-at", "40", "--resume-from", str(tmp_path / "saved"))
    assert resumed == uninterrupted
