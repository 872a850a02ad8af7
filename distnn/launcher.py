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


def run_forwarding_signals(cmd, env, completed=lambda: False) -> int:
    """Run `cmd` (an mpiexec command line) to its end, passing FORWARDED signals on; its exit code,
    128 + N when signal N killed it, as a shell reports it, or 0 where `completed()` says the
    job recorded its own end. A signal that came before (`distnn train` holds them from its first
    line) stops it before it starts: 128 + N."""
    child, asked = None, []

    def forward(signum, frame):
        asked.append(signum)
        if child is None:
            return
        if signum == signal.SIGINT and asked.count(signum) == 2:
            # mpiexec aborts the job on a second SIGINT, mid-checkpoint: only a third goes on
            print("distnn: stopping: the ranks are writing the checkpoint; Ctrl-C again to abort "
                  "at once, without it", file=sys.stderr, flush=True)
            return
        child.send_signal(FORWARDED[signum])  # to every rank: checkpoint, then exit 128+N

    # `distnn train` holds SIGINT/SIGTERM from its first line: then this process is the launch's
    # own, and keeps `forward` to its end (a signal after the job is passed to no one), where a
    # restored default would kill it on its way out
    own = {signal.SIGINT, signal.SIGTERM} <= signal.pthread_sigmask(signal.SIG_BLOCK, ())
    saved = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # one held until now arrives
        if asked:
            print(f"distnn: stopped by {signal.Signals(asked[0]).name} before the ranks started; "
                  f"nothing was trained or written", file=sys.stderr)
            return 128 + asked[0]
        # Own session: a terminal's Ctrl-C reaches only us, and we pass it on (not the second:
        # see forward). A closed stdout (`>&-`) is
        # None here; mpiexec fails on a closed descriptor, so give it null. Signals wait while
        # the child starts (it unblocks them in its own copy): each reaches it once, after.
        stdout = subprocess.DEVNULL if sys.stdout is None else None
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                     start_new_session=True,
                                     preexec_fn=_child_setup(os.getpid()))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        code = child.wait()
    finally:
        for s, handler in saved.items() if not own else ():
            signal.signal(s, handler)
    if completed():  # a rank that died of a signal after that record (Python gives up its
        return 0  # handlers as it exits) took nothing from the job
    if asked and code == FORWARDED[asked[0]]:  # mpiexec's code for a rank that died of it: one
        # in its first milliseconds, before `distnn train`'s first line held the signal
        print(f"distnn: stopped by {signal.Signals(asked[0]).name} while the ranks were "
              f"starting; nothing was trained or written", file=sys.stderr)
        return 128 + FORWARDED[asked[0]]
    return code if code >= 0 else 128 - code


def _child_setup(parent):
    """The child's preexec_fn: signals unblocked again, and SIGTERM when this launcher dies,
    even by SIGKILL (Linux PR_SET_PDEATHSIG), so the ranks, in their own session, checkpoint and
    stop instead of running on unwatched (where prctl is unavailable, only the first)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def setup():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        if prctl is not None:
            prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the launcher died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
    return setup
