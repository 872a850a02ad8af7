"""Node shared memory: one MPI-3 shared window that every rank of a node reads and writes.

Per rank the window holds an input (a step buffer, or deterministic mode's chunk rows), a slot as
long as one input row, and a note of two numbers. The operations are named steps that callers
compose (comm's allreduce, step.py's sharded update):

    fence          every rank's writes are seen by every rank's reads after it
    sum_slice      this rank's slice of the sum of all ranks' inputs, into its slot
    grid_slice     the same on deterministic mode's exact grid (exactsum.SignalGrid)
    post / notes   each rank's verdict on its slice and a number it shares
    collect        every rank's slice of the slots, into an array of this rank's
    gather         every rank's slice of a vector of its own, to every rank

Each slice is summed by one rank in rank order, so every rank gets the same bits. Measured in a
2-rank training step of the large net (7.1 MiB float32): 0.79 ms against 1.30 ms for MPICH's
Allreduce; at 14.2 MiB float64 MPICH's is faster (1.50 against 2.21 ms), hence SHARED_MAX_BYTES for
a plain sum (a sharded update pays at any size: each rank then updates only its slice).
"""
import os

import numpy as np
from mpi4py import MPI

SHARED_MAX_BYTES = 8 << 20  # a plain allreduce's buffer larger than this keeps MPI's allreduce
SUM_BLOCK = 1 << 16  # elements a rank sums at a time: its partial sum stays in cache
SHARED_TOTAL_BYTES = 256 << 20  # per process: past it (Trainers never closed), buffers are plain
SHM_DIR = "/dev/shm"  # where MPICH maps shared windows on Linux; a container may give it 64 MiB
REDUCIBLE = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64))


class SharedWindow:
    """Inputs, slots and notes of every rank of a node; `barrier(what)` is the watched barrier."""

    def __init__(self, node, shape, dtype, barrier):
        dtype, n, size = np.dtype(dtype), shape[-1], int(np.prod(shape))
        self.win = MPI.Win.Allocate_shared((size + n + 2) * dtype.itemsize, dtype.itemsize,
                                           comm=node)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, for Sync's memory fences
        memory = [np.frombuffer(self.win.Shared_query(p)[0], dtype, count=size + n + 2)
                  for p in range(node.Get_size())]
        self.inputs = [m[:size].reshape(shape) for m in memory]  # (n,) or (rows, n) per rank
        self.slots = [m[size:size + n] for m in memory]  # (n,) per rank
        self._notes = [m[size + n:] for m in memory]  # (2,) per rank: verdict, shared number
        self.rank, self.barrier = node.Get_rank(), barrier
        self.buffer = self.inputs[self.rank]
        self.slot = self.slots[self.rank]
        memory[self.rank][...] = 0  # touch every page now: a shortfall shows here, not mid-training
        self.nbytes = memory[self.rank].nbytes
        self.cuts = even_cuts(n, len(memory))  # each rank's slice of a plain sum
        self._scratch = None  # grid_slice's two float64 blocks (SignalGrid.sum_into)

    def fence(self, what) -> None:
        """MPI's shared-memory idiom: Win_sync, barrier, Win_sync (writes seen before reads)."""
        self.win.Sync()
        self.barrier(what)
        self.win.Sync()

    def sum_slice(self, lo, hi) -> None:
        """slot[lo:hi] = the sum of every rank's input[lo:hi], in rank order, block by block."""
        first, *rest = self.inputs
        for at in range(lo, hi, SUM_BLOCK):
            b = slice(at, min(at + SUM_BLOCK, hi))
            mine = self.slot[b]
            np.add(first[b], rest[0][b], out=mine) if rest else np.copyto(mine, first[b])
            for other in rest[1:]:
                mine += other[b]

    def grid_slice(self, counts, grid, first_block, last_block) -> None:
        """The exact sum of every rank p's first counts[p] input rows over the grid's blocks
        first_block:last_block, rounded once to the inputs' dtype, into the slot."""
        if self._scratch is None or self._scratch.shape[1] < grid.width:
            self._scratch = np.empty((2, grid.width))
        chunks = [rows[:k] for rows, k in zip(self.inputs, counts)]
        grid.sum_into(chunks, self.slot, first_block, last_block, self._scratch)

    def post(self, finite, number=0.0) -> None:
        """This rank's note: whether its slice is finite, and a number for every rank."""
        self._notes[self.rank][:] = bool(finite), number

    def notes(self):
        """Every rank's (finite, number), in rank order (after a fence)."""
        return [(bool(note[0]), float(note[1])) for note in self._notes]

    def collect(self, out, cuts, skip_mine=False) -> None:
        """out[a:b] = slots[p][a:b] for every rank p's slice cuts[p]:cuts[p + 1] (after a fence)."""
        for p, (a, b) in enumerate(zip(cuts, cuts[1:])):
            if not (skip_mine and p == self.rank):
                out[a:b] = self.slots[p][a:b]

    def gather(self, vector, cuts, what) -> None:
        """Every rank's slice cuts[rank]:cuts[rank + 1] of its `vector` to every rank."""
        cuts = [min(c, len(vector)) for c in cuts]
        self.fence(what)  # no rank still reads the slots of the last step
        mine = slice(cuts[self.rank], cuts[self.rank + 1])
        self.slot[mine] = vector[mine]
        self.fence(what)
        self.collect(vector, cuts, skip_mine=True)

    def allreduce(self, what) -> None:
        """Every rank's input becomes the sum of all of them."""
        self.fence(what)  # every input is written
        self.sum_slice(self.cuts[self.rank], self.cuts[self.rank + 1])
        self.fence(what)  # every slice is summed; no rank reads the inputs again this step
        self.collect(self.buffer, self.cuts)  # a slot is rewritten only after the next fence

    def grid_sum(self, counts, grid, out, what) -> None:
        """out = the exact grid sum of every rank p's first counts[p] rows."""
        blocks, cuts = grid.owner_cuts(len(self.inputs))
        self.fence(what)  # every rank's chunks are written
        self.grid_slice(counts, grid, blocks[self.rank], blocks[self.rank + 1])
        self.fence(what)  # every block is summed; no rank reads the chunks again this step
        self.collect(out, cuts)

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()


def even_cuts(n, ranks):
    """Boundaries of `ranks` nearly equal slices of range(n)."""
    return [n * p // ranks for p in range(ranks + 1)]


def room_for(nbytes) -> bool:
    """Whether SHM_DIR has nbytes free (True where it does not exist: not Linux's layout)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return True
    return st.f_bavail * st.f_frsize >= nbytes
