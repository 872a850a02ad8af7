"""`Comm`: the collectives training needs, on numpy buffers, each under the watchdog.

In-place bucketed allreduce of the flat step buffer (through node shared memory where every rank
is on one node), broadcasts, agreement checks, failing together, the exact (deterministic) sum,
and abort. A run without mpiexec is size 1 of the same code: every collective returns before
calling MPI.
"""
import atexit
import contextlib
import json
import math
import os
import sys
import time
import zlib
from typing import NoReturn

import numpy as np
from mpi4py import MPI

from .. import exactsum
from ..threads import usable_cpus
from . import shared
from .errors import RankError, same_kind
from .watchdog import Watchdog

ABORT_GRACE_S = 0.3  # without it MPICH's mpiexec sometimes drops the last message of an aborting rank


class Comm:
    """A communicator with in-place collectives on numpy buffers, a watchdog and a size-1 fast path."""

    def __init__(self, comm=None, *, timeout=None, bucket_bytes=4 << 20, shared_memory=True):
        # bucket_bytes: on a 32 MB buffer, 2-16 MB buckets cost the same (~4 ms, 2 ranks) and one
        # 32 MB call ~2.5x that; 4 MB stays well clear of MPICH's slowdown between 16 and 32 MB
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        self.timeout = self.bucket_bytes = self.watchdog = None
        self.configure(timeout=timeout, bucket_bytes=bucket_bytes)
        self.shared_memory = bool(shared_memory)  # let `buffer` use node shared memory
        self._windows = {}  # id(buffer) -> SharedWindow, for the buffers `buffer` handed out
        self._layout = None  # node(), once asked
        if timeout is not None and self.size > 1:
            ranks, cpus = self.node()
            self.watchdog = Watchdog(self.comm, timeout, ranks > cpus, self.abort)
            atexit.register(self.close)  # an unfreed window makes UCX complain at MPI_Finalize

    def configure(self, *, timeout=None, bucket_bytes=None) -> None:
        """Set the deadline of later collectives (seconds; math.inf: none, though a stop
        request's grace still holds) and the allreduce's bucket size; None leaves one as it is.
        A Comm made without a watchdog gets none here (making one is collective)."""
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"watchdog timeout must be positive seconds or None, got {timeout!r}")
            self.timeout = timeout
            if self.watchdog is not None:
                self.watchdog.timeout = timeout
        if bucket_bytes is not None:
            if not 8 <= bucket_bytes < math.inf:
                raise ValueError(f"bucket_bytes must be a finite number >= 8, got {bucket_bytes!r}")
            self.bucket_bytes = int(bucket_bytes)

    def close(self) -> None:
        """Free the watchdog's and the shared buffers' windows (collective; idempotent; also at
        exit). Arrays from `buffer` die with it: they must not be used afterwards."""
        for window in list(self._windows.values()):
            self.release(window.buffer)
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        atexit.unregister(self.close)

    # -- node shared memory ---------------------------------------------------------------------

    def buffer(self, n, dtype, rows=None, sharded=False) -> np.ndarray:
        """A zeroed (n,) array for `allreduce`, or with `rows` a (rows, n) array of chunk rows for
        `grid_sum` (collective). With every rank on one node it lives in node shared memory (see
        `window`) until `release(buf)` or `close()`; else (or past SHARED_TOTAL_BYTES live, or
        without room in SHM_DIR) a plain array. SHARED_MAX_BYTES bounds only a plain sum's
        buffer: one whose sum each rank updates a slice of (`sharded`), or chunk rows rounded in
        cache, pays at any size."""
        dtype = np.dtype(dtype)
        shape = (n,) if rows is None else (rows, n)
        nbytes = ((rows or 1) + 1) * n * dtype.itemsize  # per rank: its rows and its slot
        live = self.shared_nbytes
        plain = rows is None and not sharded
        if (self.size == 1 or not self.shared_memory or dtype not in shared.REDUCIBLE
                or (plain and n * dtype.itemsize > shared.SHARED_MAX_BYTES)
                or live + nbytes > shared.SHARED_TOTAL_BYTES
                or self.any(not shared.room_for(2 * nbytes * self.size))):  # a full SHM_DIR: SIGBUS
            return np.zeros(shape, dtype)
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            if node.Get_size() != self.size:  # ranks on several nodes: MPI's allreduce
                return np.zeros(shape, dtype)
            window = None
            with contextlib.suppress(MPI.Exception):  # no shared windows on this MPI
                window = shared.SharedWindow(node, shape, dtype, self.barrier)
            if self.any(window is None):  # no shared window on some rank: plain arrays for all
                if window is not None:
                    window.free()
                return np.zeros(shape, dtype)
        finally:
            node.Free()
        self._windows[id(window.buffer)] = window
        atexit.register(self.close)  # the windows must be freed before MPI_Finalize
        return window.buffer

    @property
    def shared_nbytes(self) -> int:
        """Bytes of node shared memory this rank holds for its buffers."""
        return sum(w.nbytes for w in self._windows.values())

    def window(self, buf):
        """The SharedWindow behind buf (from `buffer`), or None for an array of its own."""
        window = self._windows.get(id(buf))
        return window if window is not None and window.buffer is buf else None

    def shares(self, buf) -> bool:
        """Whether buf lives in node shared memory (it came from `buffer` there)."""
        return self.window(buf) is not None

    def release(self, buf) -> None:
        """Free the shared memory behind buf, from `buffer` (collective; plain arrays: nothing).
        buf and its views must not be used afterwards."""
        if self.shares(buf):
            self._windows.pop(id(buf)).free()

    # -- collectives on numpy buffers ---------------------------------------------------------

    def allreduce(self, buf, what="allreduce") -> None:
        """In-place SUM over ranks of a contiguous 1-D float32/float64/int64 array, bucket by
        bucket (or through node shared memory, for a buffer from `buffer`)."""
        window = self.window(buf)
        if window is not None and buf.ndim == 1:
            window.allreduce(what)
        else:
            self._reduce(buf, MPI.SUM, what)

    def grid_sum(self, rows, counts, grid, out, what="exact sum") -> None:
        """Deterministic mode's gradient sum at one rank or over chunk rows in node shared memory:
        out = Σ over ranks p of their first counts[p] rows, each rounded to `grid`
        (exactsum.SignalGrid) and added exactly, rounded once to out's dtype. The rank owning a
        block of parameters rounds every rank's chunks there, in cache: the bits of exactsum's
        encode and an MPI SUM (every order gives them), with no float64 vector in memory."""
        if self.size == 1:
            grid.sum_into([rows[:counts[0]]], out)
        else:
            self.window(rows).grid_sum(counts, grid, out, what)

    def allreduce_max(self, buf, what="allreduce_max") -> None:
        """In-place element-wise MAX over ranks (same buffers as allreduce)."""
        self._reduce(buf, MPI.MAX, what)

    def bcast(self, buf, root=0, what="bcast") -> None:
        """In-place broadcast of a contiguous numpy array from root."""
        self._collective("Bcast", buf, root, what=what)

    def bcast_json(self, obj, root=0):
        """Root's JSON-able obj on every rank (a JSON round-trip on root too: all see the same)."""
        data = (np.frombuffer(bytearray(json.dumps(obj).encode()), np.uint8)
                if self.rank == root else None)
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

    def barrier(self, what="barrier") -> None:
        """Wait for every rank."""
        self._collective("Barrier", what=what)

    def check_agree(self, buf, what="parameters") -> None:
        """Raise RankError on every rank unless buf has the same bytes on every rank."""
        sums = np.zeros(self.size, np.int64)  # slot r holds rank r's checksum after the SUM
        sums[self.rank] = zlib.crc32(np.ascontiguousarray(buf))
        self.allreduce(sums, f"check_agree({what})")
        differ = np.flatnonzero(sums != sums[0]).tolist()
        if differ:
            raise RankError(f"ranks disagree on {what}: ranks {differ} differ from rank 0 (crc32 "
                            f"{sums[0]:#010x} on rank 0, {sums[differ[0]]:#010x} on rank {differ[0]})")

    def fail_together(self, error: BaseException | None) -> None:
        """Collective: if any rank passes an error, every rank raises (others: the lowest failing
        rank's, as the same class where it can be built here)."""
        first = np.array([self.size if error is None else self.rank], np.int64)
        self._collective("Allreduce", MPI.IN_PLACE, first, MPI.MIN, what="fail_together")
        first = int(first[0])
        if first == self.size:
            return
        kind = type(error)
        info = self.bcast_json({"module": kind.__module__, "name": kind.__qualname__,
                                "message": str(error)} if self.rank == first else None, root=first)
        if error is not None:
            raise error
        raise same_kind(info, f"rank {first}: {info['message']}")

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
        """Sum over all ranks' chunks (rows: (n_local, m)), the same bits for any rank count and
        split: the MAX that sets the grid, then the float64 SUM on it (exactsum.py). Raises
        exactsum.NonFiniteError on every rank alike if any chunk holds NaN or Inf."""
        rows = exactsum.check_rows(rows)
        if rows.shape[0] > n_chunks_total:
            raise ValueError(f"rank {self.rank} holds {rows.shape[0]} chunks, more than the "
                             f"{n_chunks_total} chunks in total")
        m = rows.shape[1]
        maxabs = exactsum.local_maxabs(rows)
        self.allreduce_max(maxabs, f"{what} (exact sum: max)")
        magic = exactsum.magic_for(maxabs, n_chunks_total)
        total = exactsum.encode(rows, magic, np.empty(m))
        self.allreduce(total, f"{what} (exact sum)")
        return total.astype(rows.dtype)

    # -- deadlines, the node, the end -----------------------------------------------------------

    def hurry(self, seconds) -> None:
        """From now on each collective inside `urgent()` gets at most `seconds` from its start or
        from now, whichever is later (None: back to the timeout alone). A rank asked to stop
        calls it: its peers must reach the step that agrees on stopping soon, and one that stalled
        must not hold the job for the whole timeout; work outside the steps (validation, a
        checkpoint) keeps the full timeout. No effect without a watchdog."""
        if self.watchdog is not None:
            self.watchdog.hurry(seconds)

    def urgent(self):
        """Context: the collectives inside may be cut short by `hurry` (a training step's)."""
        return self.watchdog.urgent() if self.watchdog is not None else contextlib.nullcontext()

    def local_ranks(self) -> int:
        """How many ranks of this communicator share this node (collective)."""
        return self.node()[0]

    def blas_share(self) -> int:
        """BLAS threads per rank so the node's ranks together use its CPUs once (collective)."""
        ranks, cpus = self.node()
        return max(1, cpus // ranks)

    def node(self):
        """(ranks on this node, CPUs they may run on together): the union of their affinity
        masks, since a rank bound to one core by the launcher sees only that core. Collective
        the first time (every rank asks at the same points); the layout is kept after."""
        if self._layout is None:
            self._layout = self._node_layout()
        return self._layout

    def _node_layout(self):
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        if self.size == 1:
            return 1, usable_cpus()
        # Split_type and allgather block in MPI, out of the watchdog's reach: every rank is
        # seen to arrive first, under the deadline, so they find their peers there
        self.barrier("node layout")
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            masks = node.allgather(mine)  # a few small lists, once: the pickling call is fine here
        finally:
            node.Free()
        if any(m is None for m in masks):
            return len(masks), os.cpu_count() or 1
        return len(masks), len(set().union(*masks))

    def abort(self, code=1, message=None) -> NoReturn:
        """Print message to stderr, flush, and end the whole job with exit code `code` (size 1:
        sys.exit)."""
        if message:
            print(message, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size == 1:
            sys.exit(code)
        time.sleep(ABORT_GRACE_S)  # let mpiexec forward the message before the abort kills the pipes
        self.comm.Abort(code)

    def _reduce(self, buf, op, what):
        """Allreduce op in place over buf, one MPI call per bucket of bucket_bytes."""
        if not (isinstance(buf, np.ndarray) and buf.ndim == 1 and buf.flags.c_contiguous
                and buf.dtype in shared.REDUCIBLE):
            raise TypeError(f"{what}: needs a contiguous 1-D float32/float64/int64 numpy array, "
                            f"got {type(buf).__name__} {getattr(buf, 'shape', '')} "
                            f"{getattr(buf, 'dtype', '')}")
        step = max(1, self.bucket_bytes // buf.itemsize)
        # one bucket in flight at a time: several outstanding Iallreduce on a 32 MB buffer run as
        # slowly as one 32 MB call (~3x the bucketed time, MPICH 5.0.2, 2 ranks)
        for start in range(0, buf.size, step):
            self._collective("Allreduce", MPI.IN_PLACE, buf[start:start + step], op, what=what)

    def _collective(self, name, *args, what):
        """comm.<name>(*args); with a watchdog, its non-blocking I<name> against the deadline."""
        if self.size == 1:
            return
        if self.watchdog is None:
            getattr(self.comm, name)(*args)
        else:
            self.watchdog.run(name, *args, what=what)
