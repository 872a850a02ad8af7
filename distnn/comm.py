"""The seam between the math and MPI: the only distnn module that imports mpi4py.

Comm wraps a communicator with the few collectives training needs: in-place bucketed allreduce of the
flat gradient buffer, broadcasts, agreement checks, failing together, and the exact (deterministic)
sum. A run without mpiexec is size 1 of the same code: every collective returns before calling MPI.

When every rank is on one node, `buffer` hands out arrays (up to SHARED_MAX_BYTES) that live in an
MPI-3 shared-memory window, and allreduce sums them there: each rank adds one slice of all the
ranks' buffers and copies the summed slices back, two barriers in all. Measured in a 2-rank training
step of the large net (7.1 MiB float32 gradient): 0.79 ms against 1.30 ms for MPICH's Allreduce.
Each slice is summed once, in rank order, so every rank gets the same bits. Ranks on several nodes
keep MPI's allreduce. Deterministic mode's chunk rows live there too (`buffer(..., rows=k)`), and
`grid_sum` has the rank that owns each block of parameters round every rank's chunks onto the
exact grid and add them in float64 in cache, so only the net's own dtype crosses memory.

Watchdog (timeout set): each collective is started non-blocking and polled against a deadline; past
it the rank prints which collective stalled and which ranks never arrived, and aborts the job (exit
code 3) so that no rank waits forever on a peer that stalled or exited. Arrival is read from a
one-sided window: every rank writes its collective counter into its own window memory before each
call, and the rank that timed out reads its peers' counters with a bounded wait. On one node (MPICH
ch4, shared memory) the read needs nothing from the target, so a sleeping peer is read too; where a
read needs the target's progress and gets none, that rank is reported as not arrived, saying so.
The window is freed at exit (collectively): a rank that exits while its peers still train waits
there until their watchdog ends the job, rather than mpiexec reporting a false success. After a
stop request (`hurry`) the collectives of a training step (`urgent`) get a short grace instead of
the whole timeout: a peer that stalled then cannot hold a job asked to stop.
"""
import atexit
import contextlib
import json
import os
import sys
import time
import traceback
import zlib
from typing import NoReturn

import numpy as np
from mpi4py import MPI

from . import exactsum
from .threads import usable_cpus

SPIN_S = 0.005  # poll without sleeping this long first: small collectives pay no sleep latency
SLEEP_S = 0.0005  # then sleep between polls; MPICH progresses a collective only inside MPI calls
READ_S = 1.0  # bounded wait for the peers' arrival counters after a timeout
WATCHDOG_EXIT = 3
ABORT_GRACE_S = 0.3  # without it MPICH's mpiexec sometimes dropped the last message of an aborting rank
_REDUCIBLE = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64))
# Larger buffers keep MPI's allreduce: summing whole slices then copying them back leaves the cache
# (measured in one 2-rank training step: 7.1 MiB float32 0.79 ms against MPICH's 1.30 ms, but
# 14.2 MiB float64 2.21 ms against 1.50 ms)
SHARED_MAX_BYTES = 8 << 20
SUM_BLOCK = 1 << 16  # elements a rank sums at a time: its partial sum stays in cache
SHARED_TOTAL_BYTES = 256 << 20  # per process: past it (Trainers never closed), buffers are plain
SHM_DIR = "/dev/shm"  # where MPICH maps shared windows on Linux; a container may give it 64 MiB


class RankError(RuntimeError):
    """Ranks disagree (e.g. parameter checksums differ); raised on every rank with the same message."""


class Comm:
    """A communicator with in-place collectives on numpy buffers, a watchdog and a size-1 fast path."""

    def __init__(self, comm=None, *, timeout=None, bucket_bytes=4 << 20, shared_memory=True):
        # bucket_bytes: on a 32 MB buffer, 2-16 MB buckets cost the same (~4 ms, 2 ranks) and one 32 MB
        # call ~2.5x that; 4 MB stays well clear of MPICH's slowdown between 16 and 32 MB
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        if timeout is not None and not timeout > 0:
            raise ValueError(f"watchdog timeout must be positive seconds or None, got {timeout!r}")
        if bucket_bytes < 8:
            raise ValueError(f"bucket_bytes must be at least 8, got {bucket_bytes!r}")
        self.timeout, self.bucket_bytes = timeout, int(bucket_bytes)
        self._hurry = None  # (monotonic time of the request, seconds) set by `hurry`
        self._urgent = False  # inside `urgent()`: the collectives `hurry` may cut short
        self._calls = 0  # collectives started; the watchdog's arrival counter
        self._win = None
        self.shared_memory = bool(shared_memory)  # let `buffer` use node shared memory
        self._shared = {}  # id(buffer) -> _SharedSum, for the buffers `buffer` handed out
        if timeout is not None and self.size > 1:
            self._win = MPI.Win.Allocate(8, 8, comm=self.comm)  # collective: one int64 per rank
            self._arrived = np.frombuffer(self._win.tomemory(), np.int64)
            self._arrived[0] = 0
            atexit.register(self.close)  # an unfreed window makes UCX complain at MPI_Finalize
            # More ranks than cores on a node: a spinning rank takes the core a peer needs to reach
            # the collective (measured: 6x slower at 4 ranks on 2 cores), so it yields instead.
            ranks, cpus = self._node()
            self._oversubscribed = ranks > cpus

    def close(self) -> None:
        """Free the watchdog's and the shared buffers' windows (collective; idempotent; also at exit).
        Arrays from `buffer` die with it: they must not be used afterwards."""
        for buf in [s.buffer for s in self._shared.values()]:
            self.release(buf)
        if self._win is not None:
            self._win.Free()
            self._win = None
        atexit.unregister(self.close)

    def buffer(self, n, dtype, rows=None, sharded=False) -> np.ndarray:
        """A zeroed (n,) array for `allreduce` (`allreduce_sharded` if `sharded`), or with `rows` a
        (rows, n) array of chunk rows for `grid_sum` (collective). With every rank on one node it
        lives in node shared memory, where the sum skips MPI's copies, until `release(buf)` or
        `close()`; else (or past SHARED_TOTAL_BYTES live, or without room in SHM_DIR) a plain
        array. SHARED_MAX_BYTES bounds only the plain allreduce's buffers: where each rank then
        updates its own slice, or rounds chunks in cache, sharing pays at any size."""
        dtype = np.dtype(dtype)
        shape = (n,) if rows is None else (rows, n)
        nbytes = ((rows or 1) + 1) * n * dtype.itemsize  # per rank: its rows and its summed slice
        live = sum(s.nbytes for s in self._shared.values())
        plain = rows is None and not sharded
        if (self.size == 1 or not self.shared_memory or dtype not in _REDUCIBLE
                or (plain and n * dtype.itemsize > SHARED_MAX_BYTES)
                or live + nbytes > SHARED_TOTAL_BYTES
                or self.any(not _room_for(2 * nbytes * self.size))):  # a full SHM_DIR is a SIGBUS
            return np.zeros(shape, dtype)
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            if node.Get_size() != self.size:  # ranks on several nodes: MPI's allreduce
                return np.zeros(shape, dtype)
            shared = None
            with contextlib.suppress(MPI.Exception):  # no shared windows on this MPI
                shared = _SharedSum(node, shape, dtype)
            if self.any(shared is None):  # no shared window on some rank: MPI's allreduce for all
                if shared is not None:
                    shared.free()
                return np.zeros(shape, dtype)
        finally:
            node.Free()
        self._shared[id(shared.buffer)] = shared
        atexit.register(self.close)  # the windows must be freed before MPI_Finalize
        return shared.buffer

    def release(self, buf) -> None:
        """Free the shared memory behind buf, from `buffer` (collective; plain arrays: nothing).
        buf and its views must not be used afterwards."""
        if self.shares(buf):
            self._shared.pop(id(buf)).free()

    # -- collectives on numpy buffers ------------------------------------------------------------

    def shares(self, buf) -> bool:
        """Whether allreduce sums buf through node shared memory (it came from `buffer` there)."""
        shared = self._shared.get(id(buf))
        return shared is not None and shared.buffer is buf

    def allreduce(self, buf, what="allreduce") -> None:
        """In-place SUM over ranks of a contiguous 1-D float32/float64/int64 array, bucket by bucket
        (or through node shared memory, for a buffer from `buffer`)."""
        if self.shares(buf) and buf.ndim == 1:
            self._shared[id(buf)].sum(lambda: self._collective("Barrier", what=what))
        else:
            self._reduce(buf, MPI.SUM, what)

    def sums_in_place(self, rows) -> bool:
        """Whether `grid_sum` can add these chunk rows: one rank, or rows in node shared memory.
        Else the caller rounds them to the grid in float64 and allreduces that."""
        return self.size == 1 or self.shares(rows)

    def grid_sum_sharded(self, rows, counts, grid, own, collect, share=None,
                         what="exact sum") -> bool:
        """`grid_sum` for chunk rows in node shared memory, with each rank getting only its part
        of the sum (grid.owner_cuts), as `allreduce_sharded` does: share, then (if all of the sum
        is finite) own, then collect."""
        return self._shared[id(rows)].grid_sum_sharded(
            lambda: self._collective("Barrier", what=what), counts, grid,
            share or (lambda lo, hi, slot: 0.0), own, collect)

    def grid_sum(self, rows, counts, grid, out, what="exact sum") -> None:
        """Deterministic mode's gradient sum, where `sums_in_place(rows)`: out = Σ over ranks p of
        their first counts[p] rows, each rounded to `grid` (exactsum.SignalGrid) and added
        exactly, then rounded once to out's dtype. rows: from `buffer(n, dtype, rows=k)`.

        The rank that owns a block of parameters rounds every rank's chunks there, in cache, and
        writes the sum in the net's dtype: no float64 vector crosses memory, and the result has
        the bits that exactsum's encode and an MPI SUM give (every order gives them)."""
        if self.size == 1:
            grid.sum_into([rows[:counts[0]]], out)
            return
        shared = self._shared[id(rows)]
        shared.grid_sum(lambda: self._collective("Barrier", what=what), counts, grid, out)

    def allreduce_sharded(self, buf, own, collect, share=None, what="allreduce") -> bool:
        """The sum over ranks of a buffer in node shared memory (`shares(buf)`), each rank getting
        its own slice only: share(lo, hi, slot) may first work on this rank's slice [lo, hi) of
        the sum, held in slot (this rank's shared vector as long as buf), and return a number for
        every rank. If every element of the sum is finite (returns True, else False and nothing
        more happens, on every rank): own(lo, hi, slot, shared) runs with every rank's number in
        rank order, and may overwrite slot[lo:hi] with results for the others; then
        collect(p, lo, hi, slot) runs for every rank p's slice and slot, own's results in them.
        How a rank updates only its share of the parameters (shared: the parts of a global norm),
        and no rank updates any when a NaN/Inf reached the sum."""
        return self._shared[id(buf)].sum_sharded(lambda: self._collective("Barrier", what=what),
                                                 share or (lambda lo, hi, slot: 0.0), own, collect)

    def gather_slices(self, buf, vector, cuts=None, what="gather") -> None:
        """Make `vector` (laid out like a prefix of the shared `buf`) whole on every rank from
        the slices each rank owns in `allreduce_sharded` (or cuts[rank]:cuts[rank + 1], as in
        `grid_sum_sharded`), e.g. sharded optimizer state."""
        self._shared[id(buf)].gather(lambda: self._collective("Barrier", what=what), vector, cuts)

    def allreduce_max(self, buf, what="allreduce_max") -> None:
        """In-place element-wise MAX over ranks (same buffers as allreduce)."""
        self._reduce(buf, MPI.MAX, what)

    def bcast(self, buf, root=0, what="bcast") -> None:
        """In-place broadcast of a contiguous numpy array from root."""
        self._collective("Bcast", buf, root, what=what)

    def bcast_json(self, obj, root=0):
        """Root's JSON-able obj on every rank (JSON round-trip on root too, so all ranks see the same)."""
        data = np.frombuffer(bytearray(json.dumps(obj).encode()), np.uint8) if self.rank == root else None
        n = np.array([0 if data is None else data.size], np.int64)
        self.bcast(n, root, what="bcast_json length")
        if data is None:
            data = np.empty(n[0], np.uint8)
        self.bcast(data, root, what="bcast_json")
        return json.loads(data.tobytes())

    def any(self, flag: bool) -> bool:
        """Logical OR of flag across ranks (to agree on stopping or failing)."""
        buf = np.array([int(bool(flag))], np.int64)
        self.allreduce_max(buf, "any")
        return bool(buf[0])

    def barrier(self) -> None:
        """Wait for every rank."""
        self._collective("Barrier", what="barrier")

    def check_agree(self, buf, what="parameters") -> None:
        """Raise RankError on every rank unless buf has the same bytes on every rank."""
        sums = np.zeros(self.size, np.int64)  # slot r holds rank r's checksum after the SUM
        sums[self.rank] = zlib.crc32(np.ascontiguousarray(buf))
        self.allreduce(sums, f"check_agree({what})")
        differ = np.flatnonzero(sums != sums[0]).tolist()
        if differ:
            raise RankError(f"ranks disagree on {what}: ranks {differ} differ from rank 0 "
                            f"(crc32 {sums[0]:#010x} on rank 0, {sums[differ[0]]:#010x} on rank {differ[0]})")

    def fail_together(self, error: BaseException | None) -> None:
        """Collective: if any rank passes an error, every rank raises (others: the lowest failing rank's)."""
        first = np.array([self.size if error is None else self.rank], np.int64)
        self._collective("Allreduce", MPI.IN_PLACE, first, MPI.MIN, what="fail_together")
        first = int(first[0])
        if first == self.size:
            return
        kind = type(error)
        info = self.bcast_json({"module": kind.__module__, "name": kind.__qualname__, "message": str(error)}
                               if self.rank == first else None, root=first)
        if error is not None:
            raise error
        raise _same_kind(info, f"rank {first}: {info['message']}")

    def together(self, fn, *args, root_only=False, catch=(Exception,)):
        """fn(*args) on every rank (on rank 0 alone if root_only: files, printing), returning its
        result (None where it did not run). An error of a kind in `catch` on any rank is raised
        on every rank, instead of leaving the others waiting in their next collective."""
        result, error = None, None
        if self.is_root or not root_only:
            try:
                result = fn(*args)
            except catch as e:
                error = e
        self.fail_together(error)
        return result

    def exact_sum(self, rows, n_chunks_total, what="step"):
        """Sum over all ranks' chunks (rows: (n_local, m)), equal in bits for any rank count and split.

        Two collectives: the MAX that sets the grid, the float64 SUM on it (exactsum.py). Raises
        exactsum.NonFiniteError on every rank alike if any chunk holds NaN or Inf."""
        rows = exactsum.check_rows(rows)
        if rows.shape[0] > n_chunks_total:
            raise ValueError(f"rank {self.rank} holds {rows.shape[0]} chunks, more than the "
                             f"{n_chunks_total} chunks in total")
        m = rows.shape[1]
        maxabs = exactsum.local_maxabs(rows)
        self.allreduce_max(maxabs, f"{what} (exact sum: max)")
        total = exactsum.encode(rows, exactsum.magic_for(maxabs, n_chunks_total), np.empty(m), np.empty(m))
        self.allreduce(total, f"{what} (exact sum)")
        return total.astype(rows.dtype)

    def hurry(self, seconds) -> None:
        """From now on the watchdog gives each collective inside `urgent()` at most `seconds` from
        its start or from now, whichever is later (None: back to its timeout alone). A rank asked to
        stop (SIGTERM) calls it: its peers must reach the step that agrees on stopping soon, and one
        that stalled must not keep the job alive for the whole watchdog timeout; slow work outside
        the steps (validation, a checkpoint rank 0 writes) keeps the full timeout. No effect
        without a watchdog, whose calls block in MPI."""
        self._hurry = None if seconds is None else (time.monotonic(), seconds)

    @contextlib.contextmanager
    def urgent(self):
        """The collectives inside may be cut short by `hurry` (a training step's)."""
        self._urgent = True
        try:
            yield
        finally:
            self._urgent = False

    def local_ranks(self) -> int:
        """How many ranks of this communicator share this node (collective)."""
        return self._node()[0]

    def blas_share(self) -> int:
        """BLAS threads per rank so the node's ranks together use its CPUs once (collective)."""
        ranks, cpus = self._node()
        return max(1, cpus // ranks)

    def _node(self):
        """(ranks on this node, CPUs they may run on together): the union of their affinity masks,
        since a rank bound to one core by the launcher sees only that core."""
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        if self.size == 1:
            return 1, usable_cpus()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            masks = node.allgather(mine)  # a few small lists, once: the pickling call is fine here
        finally:
            node.Free()
        if any(m is None for m in masks):
            return len(masks), os.cpu_count() or 1
        return len(masks), len(set().union(*masks))

    def abort(self, code=1, message=None) -> NoReturn:
        """Print message to stderr, flush, and end the whole job with exit code `code` (size 1: sys.exit)."""
        if message:
            print(message, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size == 1:
            sys.exit(code)
        time.sleep(ABORT_GRACE_S)  # let mpiexec forward the message before the abort kills the pipes
        self.comm.Abort(code)

    # -- internals --------------------------------------------------------------------------------

    def _reduce(self, buf, op, what):
        """Allreduce op in place over buf, one MPI call per bucket of bucket_bytes."""
        if not (isinstance(buf, np.ndarray) and buf.ndim == 1 and buf.flags.c_contiguous
                and buf.dtype in _REDUCIBLE):
            raise TypeError(f"{what}: needs a contiguous 1-D float32/float64/int64 numpy array, got "
                            f"{type(buf).__name__} {getattr(buf, 'shape', '')} {getattr(buf, 'dtype', '')}")
        step = max(1, self.bucket_bytes // buf.itemsize)
        # one bucket in flight at a time: several outstanding Iallreduce on a 32 MB buffer ran as slowly
        # as one 32 MB call (~3x the bucketed time, MPICH 5.0.2, 2 ranks)
        for start in range(0, buf.size, step):
            self._collective("Allreduce", MPI.IN_PLACE, buf[start:start + step], op, what=what)

    def _collective(self, name, *args, what):
        """comm.<name>(*args); with a watchdog, its non-blocking I<name> polled against the deadline."""
        if self.size == 1:
            return
        self._calls += 1
        if self._win is None:
            getattr(self.comm, name)(*args)
            return
        self._arrived[0] = self._calls
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
            if self._oversubscribed:
                os.sched_yield()  # hand the core to a peer that has work, then poll again
            elif now - start > SPIN_S:
                time.sleep(SLEEP_S)

    def _stalled(self, what, limit):
        """Abort the job, naming the ranks whose arrival counter shows they never reached this call."""
        counts = np.full(self.size, -1, np.int64)
        self._win.Lock_all(MPI.MODE_NOCHECK)  # never unlocked: we abort below
        pending = {p: self._win.Rget(counts[p:p + 1], p, (0, 1, MPI.INT64_T))
                   for p in range(self.size) if p != self.rank}
        deadline = time.monotonic() + READ_S
        while pending and time.monotonic() < deadline:
            pending = {p: r for p, r in pending.items() if not r.Test()}
        late = [p for p in range(self.size) if p != self.rank and (p in pending or counts[p] < self._calls)]
        silent = f" (no answer from {sorted(pending)}: counted as not arrived)" if pending else ""
        self.abort(WATCHDOG_EXIT, f"distnn: watchdog: {what} did not complete {limit} on rank "
                                  f"{self.rank}; ranks not arrived: {late}{silent}")


class _SharedSum:
    """One buffer (or block of chunk rows) per rank of a node in an MPI-3 shared window, summed in
    place by `sum` (or onto a grid by `grid_sum`)."""

    def __init__(self, node, shape, dtype):
        dtype, n, size = np.dtype(dtype), shape[-1], int(np.prod(shape))
        # per rank: its buffer, the slot where it writes the slice it sums for everyone, and a
        # verdict on that slice and a number it shares (sum_sharded)
        self.win = MPI.Win.Allocate_shared((size + n + 2) * dtype.itemsize, dtype.itemsize,
                                           comm=node)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, for Sync's memory fences
        memory = [np.frombuffer(self.win.Shared_query(p)[0], dtype, count=size + n + 2)
                  for p in range(node.Get_size())]
        self.inputs = [m[:size].reshape(shape) for m in memory]
        self.sums = [m[size:size + n] for m in memory]
        self.verdicts = [m[size + n:] for m in memory]
        self.rank = node.Get_rank()
        self.buffer = self.inputs[self.rank]
        memory[self.rank][...] = 0  # touch every page now: a shortfall shows here, not mid-training
        self.nbytes = memory[self.rank].nbytes
        self.cuts = [n * p // len(memory) for p in range(len(memory) + 1)]
        self._scratch = None  # grid_sum's three float64 blocks

    def sum(self, barrier) -> None:
        """Every rank's buffer becomes the sum of all of them; barrier() waits for every rank."""
        self._fence(barrier)  # every buffer is written
        self._sum_slice()
        self._fence(barrier)  # every slice is summed; no rank reads the buffers again this step
        for p, (a, b) in enumerate(zip(self.cuts, self.cuts[1:])):
            self.buffer[a:b] = self.sums[p][a:b]  # sums[p] is rewritten only after the next barrier

    def sum_sharded(self, barrier, share, own, collect) -> bool:
        """Comm.allreduce_sharded: if the whole sum is finite, own() on this rank's summed slice,
        then collect() on every one; returns whether it was."""
        return self._sharded(barrier, self.cuts, self._sum_slice, share, own, collect)

    def grid_sum_sharded(self, barrier, counts, grid, share, own, collect) -> bool:
        """Comm.grid_sum with own/collect: the exact grid sum, each rank getting its blocks."""
        return self._sharded(barrier, *self._grid_part(counts, grid), share, own, collect)

    def _grid_part(self, counts, grid):
        """(cuts, summed) of a grid sum: every rank's parameter range, and summed() rounding and
        adding this rank's blocks of every rank's first counts[p] chunk rows into its slot."""
        blocks, cuts = grid.owner_cuts(len(self.inputs))
        r, chunks = self.rank, [rows[:k] for rows, k in zip(self.inputs, counts)]
        if self._scratch is None or self._scratch.shape[1] < grid.width:
            self._scratch = np.empty((3, grid.width))
        return cuts, lambda: grid.sum_into(chunks, self.sums[r], blocks[r], blocks[r + 1],
                                           self._scratch)

    def _sharded(self, barrier, cuts, summed, share, own, collect) -> bool:
        """The protocol of a sum of which each rank gets its slice cuts[rank]:cuts[rank + 1]:
        summed() writes it into the rank's slot; then verdicts, share, own and collect."""
        lo, hi, mine = cuts[self.rank], cuts[self.rank + 1], self.verdicts[self.rank]
        self._fence(barrier)  # every rank's input is written
        summed()
        mine[0] = np.isfinite(self.sums[self.rank][lo:hi]).all()
        if mine[0]:
            mine[1] = share(lo, hi, self.sums[self.rank])
        self._fence(barrier)  # every slice's verdict and shared number are written
        if not all(v[0] for v in self.verdicts):
            return False  # the same verdict on every rank: nobody updates anything
        own(lo, hi, self.sums[self.rank], [float(v[1]) for v in self.verdicts])
        self._fence(barrier)  # every rank has written what own() leaves for the others
        for p, (a, b) in enumerate(zip(cuts, cuts[1:])):
            collect(p, a, b, self.sums[p])
        return True

    def gather(self, barrier, vector, cuts=None) -> None:
        """Every rank's copy of its slice of `vector` (a prefix of the buffer's layout) to all;
        the slices are the sum's (or `cuts`)."""
        n = len(vector)
        cuts = [min(c, n) for c in (self.cuts if cuts is None else cuts)]
        self._fence(barrier)  # no rank still reads the slots of the last step
        mine = slice(cuts[self.rank], cuts[self.rank + 1])
        self.sums[self.rank][mine] = vector[mine]
        self._fence(barrier)
        for p, (a, b) in enumerate(zip(cuts, cuts[1:])):
            if p != self.rank:
                vector[a:b] = self.sums[p][a:b]

    def _sum_slice(self) -> None:
        """This rank's slice of the sum into its slot, block by block (the partial sum in cache)."""
        lo, hi = self.cuts[self.rank], self.cuts[self.rank + 1]
        first, *rest = self.inputs
        for at in range(lo, hi, SUM_BLOCK):
            b = slice(at, min(at + SUM_BLOCK, hi))
            mine = self.sums[self.rank][b]
            np.add(first[b], rest[0][b], out=mine) if rest else np.copyto(mine, first[b])
            for other in rest[1:]:
                mine += other[b]  # in rank order: one summation, whatever rank reads it

    def grid_sum(self, barrier, counts, grid, out) -> None:
        """out = the exact grid sum of every rank p's first counts[p] rows (Comm.grid_sum)."""
        cuts, summed = self._grid_part(counts, grid)
        self._fence(barrier)  # every rank's chunks are written
        summed()
        self._fence(barrier)  # every block is summed; no rank reads the chunks again this step
        for p, (a, b) in enumerate(zip(cuts, cuts[1:])):
            out[a:b] = self.sums[p][a:b]

    def _fence(self, barrier) -> None:
        """MPI's shared-memory idiom: Win_sync, barrier, Win_sync (writes seen before reads)."""
        self.win.Sync()
        barrier()
        self.win.Sync()

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()


def _room_for(nbytes) -> bool:
    """Whether SHM_DIR has nbytes free (True where it does not exist: not Linux's layout)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return True
    return st.f_bavail * st.f_frsize >= nbytes


def _same_kind(info, message) -> BaseException:
    """An exception of the class named in info (as loaded here), else its nearest base, with message."""
    kind = sys.modules.get(info["module"])
    for part in info["name"].split("."):
        kind = getattr(kind, part, None)
    if not (isinstance(kind, type) and issubclass(kind, BaseException)):
        return RankError(message)
    for base in kind.__mro__:  # a constructor that takes more than a message falls back to its base
        try:
            return base(message)
        except Exception:
            continue
    return RankError(message)


def install_excepthook(comm: Comm) -> None:
    """Like `python -m mpi4py`: an uncaught exception prints a rank-prefixed traceback and aborts the job."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if comm.size == 1:
            return previous(kind, value, tb)
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write("".join(f"[rank {comm.rank}] {line}\n" for line in text.splitlines()))
        comm.abort(1)

    sys.excepthook = hook


def world(**options) -> Comm:
    """Comm over MPI.COMM_WORLD; options as for Comm (timeout, bucket_bytes)."""
    return Comm(MPI.COMM_WORLD, **options)
