"""How a signal becomes a stop: recorded, never raised inside a collective; work of one rank cut
short; held signals kept for the handlers; agreed on by every rank (here, a rank of one)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from mpi4py import MPI

from distnn.comm import Comm
from distnn.stopping import Interrupted, StopRequest

pytestmark = pytest.mark.skipif("PMI_RANK" in os.environ, reason="signals this process")


@pytest.fixture
def stop():
    request = StopRequest(Comm(MPI.COMM_SELF)).install()
    yield request
    request.uninstall()


def test_a_signal_only_records_the_request(stop):
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM and not stop.agreed


def test_the_check_after_a_signal_stops_with_its_number(stop):
    stop.check("while testing")  # no signal: nothing happens
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Interrupted, match="stopped by SIGINT while testing") as e:
        stop.check("while testing")
    assert e.value.signum == signal.SIGINT and stop.agreed


def test_interruptible_work_is_cut_short_by_a_signal(stop):
    def slow():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # a signal interrupts the sleep: the handler raises inside it
        return "finished"

    started = time.monotonic()
    assert stop.interruptible(slow)() is None
    assert time.monotonic() - started < 5
    assert stop.signum == signal.SIGINT
    assert stop.interruptible(lambda: "finished")() is None  # asked already: not started


def test_interruptible_work_without_a_signal_returns_its_result(stop):
    assert stop.interruptible(lambda x: x + 1)(41) == 42
    os.kill(os.getpid(), signal.SIGTERM)  # after the work: recorded only
    assert stop.signum == signal.SIGTERM


HELD = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))  # as __main__ does
import numpy  # starts BLAS threads, which inherit the mask: none of them takes the signal
from distnn.stopping import StopRequest
assert StopRequest.held()
os.kill(os.getpid(), signal.SIGTERM)  # held: neither fatal nor lost
stop = StopRequest().install()
print(stop.signum, StopRequest.held())
"""


def test_a_signal_held_before_the_handlers_arrives_when_they_are_installed():
    done = subprocess.run([sys.executable, "-c", HELD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(int(signal.SIGTERM)), "False"]


def test_a_fit_inside_installed_handlers_keeps_a_signal_that_came_before(stop):
    os.kill(os.getpid(), signal.SIGINT)
    with stop.watching():
        assert stop.signum == signal.SIGINT


def test_a_fit_of_its_own_starts_afresh_and_gives_the_handlers_back():
    stop = StopRequest(Comm(MPI.COMM_SELF))
    stop.signum = signal.SIGTERM  # of an earlier fit: spent
    before = signal.getsignal(signal.SIGINT)
    with stop.watching():
        assert stop.signum == 0 and signal.getsignal(signal.SIGINT) == stop.ask
    assert signal.getsignal(signal.SIGINT) is before
