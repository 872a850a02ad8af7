"""The watchdog: every collective of a `Comm` waits against a deadline, never forever.

A collective starts non-blocking and is polled. Past the deadline the rank prints which
collective stalled and which ranks never arrived, and aborts the job (exit code WATCHDOG_EXIT),
so that no rank waits forever on a peer that stalled or exited. Arrival is read from a one-sided
window: every rank writes its collective counter into its own window memory before each call,
and the rank that timed out reads its peers' counters with a bounded wait. On one node (MPICH
ch4, shared memory) the read needs nothing from the target, so a sleeping peer is read too; where
a read needs the target's progress and gets none, that rank is reported as not arrived, saying so.

After a stop request (`hurry`) the collectives of a training step (`urgent`) get a short grace
instead of the whole timeout: a peer that stalled cannot hold a job asked to stop.
"""
import contextlib
import os
import time

import numpy as np
from mpi4py import MPI

SPIN_S = 0.005  # poll without sleeping this long first: small collectives pay no sleep latency
SLEEP_S = 0.0005  # then sleep between polls; MPICH progresses a collective only inside MPI calls
READ_S = 1.0  # bounded wait for the peers' arrival counters after a timeout
WATCHDOG_EXIT = 3


class Watchdog:
    """Deadlines for one communicator's collectives; `abort(code, message)` ends the job."""

    def __init__(self, comm, timeout, oversubscribed, abort):
        self.comm, self.timeout, self.abort = comm, timeout, abort
        # More ranks than cores on a node: a spinning rank takes the core a peer needs to reach
        # the collective (6x slower at 4 ranks on 2 cores), so it yields instead.
        self.oversubscribed = oversubscribed
        self.calls = 0  # collectives started: this rank's arrival counter
        self._hurry = None  # (monotonic time of the request, seconds), set by `hurry`
        self._urgent = False  # inside `urgent()`: the collectives `hurry` may cut short
        self._win = MPI.Win.Allocate(8, 8, comm=comm)  # collective: one int64 per rank
        self._arrived = np.frombuffer(self._win.tomemory(), np.int64)
        self._arrived[0] = 0

    def close(self) -> None:
        """Free the arrival window (collective)."""
        self._win.Free()

    def run(self, name, *args, what) -> None:
        """comm.I<name>(*args), polled until done; past the deadline the job ends."""
        self.calls += 1
        self._arrived[0] = self.calls
        request = getattr(self.comm, "I" + name.lower())(*args)
        start = time.monotonic()
        while not request.Test():
            now = time.monotonic()
            if now - start > self.timeout:
                self._stalled(what, f"within {self.timeout:g} s")
            if self._urgent and self._hurry is not None:
                asked, grace = self._hurry
                if now > max(asked, start) + grace:
                    self._stalled(what, f"within {grace:g} s of the request to stop")
            if self.oversubscribed:
                os.sched_yield()  # hand the core to a peer that has work, then poll again
            elif now - start > SPIN_S:
                time.sleep(SLEEP_S)

    def hurry(self, seconds) -> None:
        """See Comm.hurry."""
        self._hurry = None if seconds is None else (time.monotonic(), seconds)

    @contextlib.contextmanager
    def urgent(self):
        """See Comm.urgent."""
        self._urgent = True
        try:
            yield
        finally:
            self._urgent = False

    def _stalled(self, what, limit):
        """Abort the job, naming the ranks whose arrival counter shows they never reached this call."""
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        counts = np.full(size, -1, np.int64)
        self._win.Lock_all(MPI.MODE_NOCHECK)  # never unlocked: the job aborts below
        pending = {p: self._win.Rget(counts[p:p + 1], p, (0, 1, MPI.INT64_T))
                   for p in range(size) if p != rank}
        deadline = time.monotonic() + READ_S
        while pending and time.monotonic() < deadline:
            pending = {p: r for p, r in pending.items() if not r.Test()}
        late = [p for p in range(size) if p != rank and (p in pending or counts[p] < self.calls)]
        silent = f" (no answer from {sorted(pending)}: counted as not arrived)" if pending else ""
        self.abort(WATCHDOG_EXIT, f"distnn: watchdog: {what} did not complete {limit} on rank "
                                  f"{rank}; ranks not arrived: {late}{silent}")
