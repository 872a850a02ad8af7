"""Starting MPI jobs: finding mpiexec (`train -n` and `distnn bench` use the same one), and running
a job with the launcher's SIGINT/SIGTERM passed on to it once (SIGHUP, a closed terminal, as SIGTERM).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

# Where find_mpiexec looked, for the caller's message when it found none
NOT_FOUND = (f"none beside {sys.executable} or on PATH "
             f"(pip install 'distnn[mpich]', or set MPIEXEC)")
# Passed on to mpiexec, which hands it to every rank. The ranks stop cleanly on SIGTERM/SIGINT;
# SIGHUP (the terminal closed) would kill them without a checkpoint, so it goes on as SIGTERM.
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM,
             signal.SIGHUP: signal.SIGTERM}


def find_mpiexec() -> list[str] | None:
    """$MPIEXEC (split like a shell), else the mpiexec beside this python (a venv with
    distnn[mpich]), else the one on PATH; None when there is none (NOT_FOUND says where it looked)."""
    if os.environ.get("MPIEXEC"):
        return shlex.split(os.environ["MPIEXEC"])
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    return [found] if found else None


def run_forwarding_signals(cmd, env) -> int:
    """Run `cmd` (an mpiexec command line) to its end, passing FORWARDED signals on; its exit code,
    128 + N when signal N killed it, as a shell reports it."""
    # Own session: a terminal's Ctrl-C reaches only us, and we pass it on once (a second
    # SIGINT makes mpiexec abort at once, without the checkpoint).
    # A closed stdout (`>&-`) is None here; mpiexec fails on a closed descriptor, so give it null.
    stdout = subprocess.DEVNULL if sys.stdout is None else None
    child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                             start_new_session=True, preexec_fn=_term_when_orphaned(os.getpid()))

    def forward(signum, frame):
        child.send_signal(FORWARDED[signum])  # to every rank: checkpoint, then exit 128+N

    saved = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        code = child.wait()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


def _term_when_orphaned(parent):
    """A preexec_fn: the child gets SIGTERM when this launcher dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so the ranks, in their own session, checkpoint and stop instead of running
    on unwatched. Where prctl is unavailable it does nothing."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def arm():
        prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return arm
