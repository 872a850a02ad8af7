"""Steps: the one place where the ranks' gradient sums meet the optimizer's update.

One object per way of summing and updating, chosen once by `make` when the trainer is built:

    Allreduce  every rank sums the whole step buffer (MPI's allreduce, or node shared memory)
               and applies the whole update
    Sharded    ranks on one node: each sums its slice of the step buffer in shared memory,
               updates its share of the parameters and optimizer state while the slice is hot,
               and copies the others' shares; the bits of Allreduce, a P-th of its update's
               memory traffic on each rank
    Exact      deterministic mode: each chunk of `chunk_size` samples is a fixed computation
               wherever it runs, rounded to a grid that every rank derives alike, on which
               float64 sums are exact (exactsum.py): the same bits for any rank count; its
               update is whole, or sharded over the grid's blocks

A step is called once per global batch, `step(batch, lr, stop, what) -> Verdict`: this rank's
part of the gradient, the sum across ranks, the update if the sum is finite. The step buffer is
one vector, the gradient followed by STATS numbers (loss sum, correct count, stop flag) that ride
in the same sum. Each rank divides its output proxy errors by the global batch size (with sample
weights: scales row n by w_n / Σw of the global batch, a number every rank computes alike) before
back-propagating (the gradient is linear in them), so the sum is the (weighted) mean gradient.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import data, exactsum, kernels, optim

STATS = 3  # loss sum, correct count, stop flag: ride behind the gradient in the sum
KINDS = ("auto", "whole", "sharded")  # how the update is shared out (`make`'s `update`)


def checked_update(update):
    """`update` if it names a kind of update (before a Comm is made for it)."""
    if update not in KINDS:
        raise ValueError(f"update must be one of {list(KINDS)}, got {update!r}")
    return update


class Verdict(NamedTuple):
    """A step's outcome, the same on every rank; nothing was updated unless `finite`."""

    finite: bool
    loss: float  # the batch's loss, summed over its samples
    correct: float  # correct decisions in the batch
    stop: bool  # some rank asked to stop: every rank stops after this step


@dataclass
class Batch:
    """A global batch: the sample indices `rows` of X and Y (the same on every rank)."""

    X: object  # (N, d) array-like; rows are gathered per part (memory maps welcome)
    Y: np.ndarray  # targets as Network.check_targets gives them
    rows: np.ndarray
    dtype: np.dtype
    transform: object = None  # rows -> rows, e.g. standardization
    weights: np.ndarray | None = None  # (N,) sample weights in dtype, or None: each counts 1

    def __len__(self):
        return len(self.rows)

    @property
    def divisor(self):
        """What the summed gradient is divided by: the batch's count of targets (its size, or a
        sequence model's Σ targets: Y.counts), or their Σw (computed alike on every rank from the
        whole batch; 1 if every weight is 0, whose gradient is 0)."""
        counts = self.Y.counts(np.sort(self.rows)) if hasattr(self.Y, "counts") else None
        if self.weights is None:
            return len(self.rows) if counts is None else int(counts.sum())
        w = self.weights[np.sort(self.rows)].astype(np.float64)
        total = float(w.sum() if counts is None else w @ counts)
        return total if total > 0 else 1.0

    def part(self, lo, hi):
        """(X, Y, weights or None) of rows[lo:hi], in index order (forward reads of a memory map;
        sums don't care)."""
        idx = np.sort(self.rows[lo:hi])
        w = None if self.weights is None else self.weights[idx]
        return fetch(self.X, idx, self.dtype, self.transform), self.Y[idx], w


def _steps(net, X):
    """Rows each sample adds to a gradient sum: 1, or a sequence model's time steps."""
    return net.steps(X) if hasattr(net, "steps") else 1


def fetch(X, idx, dtype, transform=None):
    """Rows idx of X in the net's dtype, transformed."""
    rows = np.asarray(X[idx], dtype=dtype)
    return rows if transform is None else transform(rows)


def make(net, optimizer, comm, *, clip_norm=0.0, update="auto", deterministic=False,
         chunk_size=64, batch_size=256):
    """The step for these settings. `update`: "sharded" where node shared memory allows (and,
    deterministic, without clipping: a norm added up from P shares rounds differently for each
    P), "whole" always, "auto" sharded where it can be."""
    if deterministic:
        return Exact(net, optimizer, comm, clip_norm, update, chunk_size, batch_size)
    if update == "whole":
        return Allreduce(net, optimizer, comm, clip_norm)
    buf = comm.buffer(net.n_params + STATS, net.dtype, sharded=True)
    kind = Sharded if comm.shares(buf) else Allreduce  # no node shared memory: MPI's allreduce
    return kind(net, optimizer, comm, clip_norm, buf)


class Allreduce:
    """Sum the whole step buffer on every rank, then the whole update."""

    sharded = False

    def __init__(self, net, optimizer, comm, clip_norm, buf=None):
        self.net, self.optimizer, self.comm, self.clip_norm = net, optimizer, comm, clip_norm
        n = net.n_params
        self.buf = comm.buffer(n + STATS, net.dtype) if buf is None else buf
        self.grad = self.buf[:n]  # a view: the gradient is summed where it is computed

    def __call__(self, batch, lr, stop, what) -> Verdict:
        self._local_sum(batch, stop)
        self.comm.allreduce(self.buf, what)
        return self._update(lr)

    def _local_sum(self, batch, stop):
        """This rank's shard of the batch: its gradient sum and statistics into buf."""
        n = self.net.n_params
        a, b = data.shard(0, len(batch), self.comm.size, self.comm.rank)
        X, Y, w = batch.part(a, b)
        self.buf[n] = self.net.grad_sum(X, Y, self.grad, divisor=batch.divisor, weights=w)
        self.buf[n + 1] = self.net.last_correct(Y) or 0
        self.buf[n + 2] = 1.0 if stop else 0.0

    def _update(self, lr) -> Verdict:
        """The whole update from the summed buffer, after its checks and penalty."""
        finite = bool(kernels.all_finite(self.buf))  # the same verdict on every rank
        if finite:
            self.net.add_penalty_grad(self.grad)
            if self.clip_norm > 0:
                optim.clip_by_global_norm(self.grad, self.clip_norm)
            self.optimizer.step(self.net.params, self.grad, lr)
        return self._verdict(finite)

    def _verdict(self, finite) -> Verdict:
        loss, correct, stop = self.buf[self.net.n_params:]
        return Verdict(finite, float(loss), float(correct), bool(stop > 0))

    def evaluate_sums(self, X, Y, transform, batch_size):
        """(loss sum, correct count) over every rank's shard of X, Y, in batches of bounded memory."""
        a, b = data.shard(0, len(X), self.comm.size, self.comm.rank)
        total = np.zeros(2, np.float64)
        for lo in range(a, b, batch_size):
            idx = np.arange(lo, min(lo + batch_size, b))
            loss, correct = self.net.eval_sums(fetch(X, idx, self.net.dtype, transform), Y[idx])
            total += loss, correct or 0
        self.comm.allreduce(total, what="validation")
        return total

    def gather_state(self):
        """Every rank's optimizer state whole (collective); whole already here."""

    def close(self):
        """Give back the step buffer's shared memory (collective)."""
        self.comm.release(self.buf)
        self.buf = self.grad = None


class _ShardedUpdate:
    """The update of a sum of which each rank holds its slice cuts[rank]:cuts[rank + 1] in its
    window slot: every rank's verdict is posted before any rank updates, so a NaN anywhere
    leaves every rank unchanged and alike."""

    sharded = True

    def _update_share(self, window, cuts, lr, what) -> bool:
        net, n, clip = self.net, self.net.n_params, self.clip_norm
        lo, hi = cuts[self.comm.rank], cuts[self.comm.rank + 1]
        mine = slice(min(lo, n), min(hi, n))  # this rank's parameters (the rest: statistics)
        grad = window.slot[mine]
        finite = bool(kernels.all_finite(window.slot[lo:hi]))
        if finite:
            net.add_penalty_grad(grad, start=mine.start)
        window.post(finite, optim.global_norm(grad) if finite and clip > 0 else 0.0)
        window.fence(what)  # every rank's verdict and norm are posted
        notes = window.notes()
        if not all(ok for ok, _ in notes):
            return False
        norm = math.sqrt(sum(x * x for _, x in notes))  # in rank order: the same on every rank
        if clip > 0 and math.isfinite(norm) and norm > clip:
            grad *= grad.dtype.type(clip / norm)
        self.optimizer.step(net.params, window.slot[:n], lr, part=mine)
        grad[...] = net.params[mine]  # what the other ranks copy
        window.fence(what)  # every rank's new parameters are posted
        window.collect(net.params, [min(c, n) for c in cuts], skip_mine=True)
        return True

    def _gather(self, window, cuts):
        """The optimizer state of every rank's share, to every rank (collective)."""
        for vector in self.optimizer.state.values():
            window.gather(vector, cuts, what="optimizer state")


class Sharded(_ShardedUpdate, Allreduce):
    """Sum the step buffer in node shared memory, each rank its slice; each rank updates its share
    of the parameters and copies the others'. The optimizer state of the other shares goes stale
    on a rank until `gather_state`."""

    def __init__(self, net, optimizer, comm, clip_norm, buf=None):
        super().__init__(net, optimizer, comm, clip_norm, buf)
        self.window = comm.window(buf)

    def __call__(self, batch, lr, stop, what) -> Verdict:
        self._local_sum(batch, stop)
        window, cuts, rank = self.window, self.window.cuts, self.comm.rank
        window.fence(what)  # every rank's gradient is written
        window.sum_slice(cuts[rank], cuts[rank + 1])
        if not self._update_share(window, cuts, lr, what):
            return self._verdict(False)
        n = self.net.n_params
        window.collect(self.buf, [max(c, n) for c in cuts])  # the statistics, wherever they are
        return self._verdict(True)

    def gather_state(self):
        self._gather(self.window, self.window.cuts)


class Exact(_ShardedUpdate, Allreduce):
    """Deterministic mode: the chunks' gradients and statistics summed exactly over all ranks.

    A MAX of the layers' signal bounds and the statistics' (a few thousand numbers) sets the
    grid; the chunk rows live in node shared memory where the comm can put them, and there the
    rank owning each block of parameters rounds every rank's chunks onto the grid and adds them
    in cache (then updates those blocks, when sharded); elsewhere each rank rounds its own chunks
    in float64 and MPI sums them (for float32 nets in a float64 vector of its own)."""

    def __init__(self, net, optimizer, comm, clip_norm, update, chunk_size, batch_size):
        n, size = net.n_params, comm.size
        super().__init__(net, optimizer, comm, clip_norm, buf=np.zeros(n + STATS, net.dtype))
        self.chunk_size = chunk_size
        most = -(-batch_size // chunk_size)  # chunks in a global batch, at most
        self.rows = comm.buffer(n, net.dtype, rows=-(-most // size))
        self.window = comm.window(self.rows)
        self.sums_in_place = size == 1 or self.window is not None  # else MPI's float64 SUM
        self.total = None if self.sums_in_place else (self.buf if net.dtype == np.float64
                                            else np.zeros(n + STATS, np.float64))
        self.sharded = self.window is not None and clip_norm == 0 and update != "whole"
        self.cuts = None  # the grid's parameter range of each rank, once known
        self.shapes = net.shapes
        self.stats = np.empty((len(self.rows), 2))
        self.flags = np.empty(STATS)  # float64: loss and correct sums on their grid, stop flag
        self.bounds = np.empty(sum(o + i for o, i in self.shapes) + 2)  # + |loss|, |correct|

    def __call__(self, batch, lr, stop, what) -> Verdict:
        try:
            grid, counts = self._chunks(batch, stop, what)
            if self.total is not None:
                return self._mpi_sum(grid, counts[self.comm.rank], lr, what)
            if self.sharded:
                return self._sharded_sum(grid, counts, lr, what)
            self.comm.grid_sum(self.rows, counts, grid, self.grad, what=f"{what} (exact sum)")
        except exactsum.NonFiniteError:  # a NaN/Inf has no grid: found before anything is rounded
            return self._verdict(False)
        self._sum_flags(what)
        return self._update(lr)

    def _chunks(self, batch, stop, what):
        """This rank's chunks' gradients into its rows, the grid they all agree on, and each
        rank's chunk count."""
        net, c, size = self.net, self.chunk_size, self.comm.size
        n_chunks = -(-len(batch) // c)
        first, last = data.chunk_range(n_chunks, size, self.comm.rank)
        rows, stats, bounds = self.rows[:last - first], self.stats[:last - first], self.bounds
        signals = bounds[:-2]
        bounds[...] = 0
        divisor = batch.divisor
        for i, j in enumerate(range(first, last)):
            X, Y, w = batch.part(j * c, min((j + 1) * c, len(batch)))
            stats[i] = (net.grad_sum(X, Y, rows[i], divisor=divisor, weights=w),
                        net.last_correct(Y) or 0)
            np.maximum(signals, net.last_signal_maxabs(X), out=signals)  # propagates NaN
        bounds[-2:] = exactsum.local_maxabs(stats)
        bounds[np.isnan(bounds)] = np.inf  # an MPI MAX may drop a NaN, never an Inf
        self.comm.allreduce_max(bounds, what=f"{what} (exact sum: bounds)")
        # a chunk adds c rows per layer, or c T for a sequence model's T steps: the grid's bound
        grid = exactsum.SignalGrid(signals, self.shapes, c * _steps(net, batch.X), n_chunks)
        exactsum.encode(stats, exactsum.magic_for(bounds[-2:], n_chunks), self.flags[:2])
        self.flags[2] = 1.0 if stop else 0.0  # flags add exactly too
        counts = [b - a for a, b in (data.chunk_range(n_chunks, size, p) for p in range(size))]
        return grid, counts

    def _mpi_sum(self, grid, mine, lr, what) -> Verdict:
        """Ranks on several nodes: each rounds its `mine` chunks in float64, one MPI SUM adds them."""
        n, total = self.net.n_params, self.total
        grid.encode(self.rows[:mine], total[:n])
        total[n:] = self.flags
        self.comm.allreduce(total, what=f"{what} (exact sum)")
        if total is not self.buf:
            self.buf[...] = total  # float32 nets: the one rounding of the exact sum
        return self._update(lr)

    def _sharded_sum(self, grid, counts, lr, what) -> Verdict:
        """Each rank sums the grid blocks it owns and updates those parameters."""
        window, rank = self.window, self.comm.rank
        blocks, self.cuts = grid.owner_cuts(self.comm.size)
        window.fence(f"{what} (exact sum)")  # every rank's chunks are written
        window.grid_slice(counts, grid, blocks[rank], blocks[rank + 1])
        if not self._update_share(window, self.cuts, lr, f"{what} (exact sum)"):
            return self._verdict(False)  # a float32 sum overflowed: no rank updated anything
        self._sum_flags(what)
        return self._verdict(True)

    def _sum_flags(self, what):
        self.comm.allreduce(self.flags, what=f"{what} (exact sum: statistics)")
        self.buf[self.net.n_params:] = self.flags

    def evaluate_sums(self, X, Y, transform, batch_size):
        """(loss sum, correct count) summed exactly over chunks (an Inf loss if any is not finite)."""
        c, n = self.chunk_size, len(X)
        n_chunks = -(-n // c)
        first, last = data.chunk_range(n_chunks, self.comm.size, self.comm.rank)
        sums = np.zeros((last - first, 2), np.float64)
        for i, j in enumerate(range(first, last)):
            idx = np.arange(j * c, min((j + 1) * c, n))
            loss, correct = self.net.eval_sums(fetch(X, idx, self.net.dtype, transform), Y[idx])
            sums[i] = loss, correct or 0
        try:
            return self.comm.exact_sum(sums, n_chunks, what="validation")
        except exactsum.NonFiniteError:
            return np.full(2, np.inf)  # an infinite validation loss, as the default mode reports

    def gather_state(self):
        if self.sharded and self.cuts is not None:
            self._gather(self.window, self.cuts)

    def close(self):
        super().close()
        self.comm.release(self.rows)
        self.rows = self.total = None
