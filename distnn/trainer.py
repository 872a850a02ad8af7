"""`Trainer`: synchronous data-parallel training of a `Network` over an MPI communicator.

Every rank holds the same parameters. Per step, along the global batch of B sample indices:

    my rows (data.shard) -> net.grad_sum(..., divisor=B) into buf -> comm.allreduce(buf)
    -> + penalty gradient -> clip -> optimizer.step(params, grad)

`buf` is one contiguous vector: the gradient followed by three statistics (loss sum, correct count,
stop flag) that ride in the same allreduce, so a step makes one MPI call (one per bucket for large
models). Each rank divides its output proxy errors by the *global* count B before back-propagating
(the gradient is linear in them), so the allreduce yields the mean gradient and P ranks compute
what 1 rank computes on the same global batches, up to the order of floating-point additions.
With every rank on one node, the sum runs in node shared memory and each rank
updates only its slice of the parameters there, then copies the others' slices: the same bits as
every rank updating everything, with a P-th of the update's memory traffic on each rank.
With `deterministic=True` the order is removed as well: every global batch is cut into chunks of
`chunk_size` samples, each chunk's gradient is a fixed computation wherever it runs, and the chunks
are rounded to a grid every rank derives alike, on which float64 sums are exact (exactsum.py), so
1, 2, 3, ... ranks produce the same bits.

The data order comes from `data.epoch_permutation(seed, epoch)`, so a checkpoint needs only
(epoch, batch, step) and the parameters and optimizer state to continue bit-identically.
Only rank 0 writes files; every rank returns the same `history`.
"""

import contextlib
import math
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
from threadpoolctl import threadpool_limits

from . import checkpoint, data, exactsum, optim
from .comm import Comm
from .network import Network
from .threads import threads_in_force

_STATS = 3  # loss sum, correct count, stop flag: ride behind the gradient in the allreduce
# After SIGTERM/SIGINT, how long the peers may take to reach the step that agrees on stopping:
# this, or four of the last step's durations if that is longer (a slow step is no stall)
STOP_GRACE_S = 30.0


class DivergenceError(RuntimeError):
    """The loss or gradient became NaN/Inf; raised on every rank at the same step."""


class Interrupted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT at a step boundary, after writing a checkpoint."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class Trainer:
    """Trains `net` data-parallel; `comm` None -> MPI.COMM_WORLD (a plain run is size 1)."""

    def __init__(self, net, optimizer=None, batch_size=256, epochs=20, seed=0, comm=None, *,
                 schedule=None, clip_norm=0.0, patience=0, checkpoint_dir=None, checkpoint_every=0,
                 keep_checkpoints=3, deterministic=False, chunk_size=64, watchdog=600.0,
                 bucket_bytes=4 << 20, check_every=100, threads=None, callback=None):
        if not isinstance(net, Network):
            raise TypeError(f"net must be a distnn.Network, got {type(net).__name__}")
        self.net = net
        self.optimizer = optimizer if optimizer is not None else optim.SGD(lr=0.01)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.epochs = _positive_int("epochs", epochs, low=0)
        self.seed = int(seed)
        self.schedule = dict(schedule or {})  # keyword arguments of optim.lr_at
        self.clip_norm = float(clip_norm)
        self.patience = _positive_int("patience", patience, low=0)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every, low=0)
        self.keep_checkpoints = _positive_int("keep_checkpoints", keep_checkpoints)
        self.deterministic = bool(deterministic)
        self.chunk_size = _positive_int("chunk_size", chunk_size, high=exactsum.MAX_CHUNK_SIZE)
        self.check_every = _positive_int("check_every", check_every, low=0)
        self.callback = callback  # called on every rank with each epoch's record
        # BLAS threads per rank during fit; None or 0: the node's cores / its ranks
        self.threads = None if threads is None else _positive_int("threads", threads, low=0)
        # watchdog: seconds a collective may wait for the other ranks before the job is aborted
        # (a rank that stalled or left); None turns it off
        self._own_comm = not isinstance(comm, Comm)  # close() closes a Comm made here
        self.comm = comm if isinstance(comm, Comm) else Comm(comm, timeout=watchdog,
                                                              bucket_bytes=bucket_bytes)
        # Progress, all of it in the checkpoint: the run continues from exactly here.
        self.epoch = 0  # completed epochs
        self.batch = 0  # completed batches of the current epoch
        self.step = 0  # completed optimizer steps
        self.history = []  # one record per completed epoch, identical on every rank
        self.partial = [0.0, 0.0]  # loss and correct sums of the current epoch so far
        self.best = {"val_loss": math.inf, "bad_epochs": 0}
        self.best_params = None  # parameters at the best validation loss (early stopping)
        self.optimizer.init(net.params)
        # The step's allreduce buffer, in node shared memory where Comm can. Deterministic mode
        # never reduces it: its chunks' gradients go to rows of their own, in node shared memory
        # where Comm can (there Comm.grid_sum adds them onto the grid), else summed on the grid in
        # float64 (for float32 nets in a buffer of its own) and reduced by MPI.
        n = net.n_params + _STATS
        self._rows = self._total = None
        if self.deterministic:
            most = -(-self.batch_size // self.chunk_size)  # chunks in a global batch, at most
            self._rows = self.comm.buffer(net.n_params, net.dtype, rows=-(-most // self.comm.size))
            self.buf = np.zeros(n, net.dtype)
            if not self.comm.sums_in_place(self._rows):
                self._total = self.buf if net.dtype == np.float64 else np.zeros(n, np.float64)
        else:  # on one node each rank updates its own share of the parameters right after
            # summing it (_sum_and_update_share), which pays at any size
            self.buf = self.comm.buffer(n, net.dtype, sharded=True)
        # deterministic mode shards its update too, over the grid's blocks (_exact_grad_sum), but
        # not with clipping: a norm added up from P shares would round differently for every P
        self._sharded = (self.comm.shares(self._rows) and self.clip_norm == 0
                         if self.deterministic else self.comm.shares(self.buf))
        self._share_cuts = None  # deterministic mode's slices of the parameters, once known
        self.grad = self.buf[:net.n_params]  # a view: the gradient is reduced where it is computed
        self._exact = None  # deterministic mode's work arrays (_exact_buffers)
        self._stop_signal = 0  # set by the signal handler on this rank only
        self._step_s = 0.0  # the last step's seconds: the stop grace is at least a few of them
        self._stop_agreed = False

    # ---- the public surface ------------------------------------------------------------------
    def fit(self, X, y, X_val=None, y_val=None, transform=None, scan=True):
        """Train on rows of X, y (this process's view of the whole data set; memory-maps welcome).

        `transform(rows) -> rows`, if given, maps each gathered batch of X (e.g. standardization).
        scan=False skips the NaN/Inf scan of X for a caller that made it already (one pass over
        a large memory map); shapes and targets are checked either way.
        Returns `history`, a list of per-epoch dicts of reduced metrics, the same on every rank."""
        if self.buf is None:
            raise RuntimeError("this Trainer was closed; make a new one (or Trainer.resume) to train")
        X, Y = self._checked_data(X, y, "training", scan)
        val = None if X_val is None else self._checked_data(X_val, y_val, "validation", scan)
        self._transform = transform
        self._stop_signal, self._stop_agreed = 0, False  # a signal of an earlier fit is spent
        self._sync_start()
        batches = data.batches(len(X), self.batch_size)
        # total_steps follows this fit's epochs (a resumed run may be given more), unless set
        self._lr_args = {"total_steps": max(1, self.epochs * len(batches))} | self.schedule
        blas = self._blas_threads()
        self.optimizer.threads = blas or threads_in_force()  # the update uses the GEMMs' cores
        with _StopOnSignals(self), threadpool_limits(blas, user_api="blas"), self._whole_state():
            while self.epoch < self.epochs and not self._stopped_early():
                started = time.perf_counter()
                perm = data.epoch_permutation(self.seed, self.epoch, len(X))
                while self.batch < len(batches):
                    lo, hi = batches[self.batch]
                    step_started = time.perf_counter()
                    with self.comm.urgent():  # after a stop request, a stalled peer ends the job
                        self._train_step(X, Y, perm, lo, hi)
                    self._step_s = time.perf_counter() - step_started
                    self.batch += 1
                    self.step += 1
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._stop_agreed:
                        self._interrupt()
                stop = self._end_epoch(len(X), val, time.perf_counter() - started)
                if stop:
                    break
        if self.patience and self.best_params is not None:
            self.net.params[...] = self.best_params  # early stopping keeps the best model
        return self.history

    def evaluate(self, X, y, transform=None):
        """(mean loss without penalty, accuracy or None) over all ranks' shards of X, y."""
        self._transform = transform
        data_ = self._checked_data(X, y, "evaluation")
        with threadpool_limits(self._blas_threads(), user_api="blas"):  # as fit: deterministic pins
            return self._evaluate(*data_)

    def close(self):
        """Give back the shared memory of the step buffers, and the Comm if this trainer made it
        (collective). The trainer cannot train afterwards; its network and history stay."""
        for buf in (self.buf, self._rows):
            self.comm.release(buf)
        self.buf = self._total = self._rows = self.grad = None
        if self._own_comm:
            self.comm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def save(self, path):
        """Write the full training state to `path` (rank 0 writes; every rank must call)."""
        self._gather_state()
        arrays = {"params": self.net.params}
        arrays |= {f"opt/{k}": v for k, v in self.optimizer.state_dict().items()}
        if self.best_params is not None:
            arrays["best_params"] = self.best_params
        self._together(checkpoint.save, path, arrays, self._meta(), root_only=True)

    def save_checkpoint(self):
        """Save into checkpoint_dir as ckpt-<step>.npz and keep the newest `keep_checkpoints`."""
        if self.checkpoint_dir is None:
            return None
        path = checkpoint.checkpoint_path(self.checkpoint_dir, self.step)
        self.save(path)
        self._together(checkpoint.prune, self.checkpoint_dir, self.keep_checkpoints, root_only=True)
        return path

    def _together(self, fn, *args, root_only=False):
        """fn(*args), on rank 0 alone if root_only (files); a failure there (disk full, a callback's
        error) is raised on every rank instead of leaving the others waiting in a collective."""
        error = None
        if self.comm.is_root or not root_only:
            try:
                fn(*args)
            except Exception as e:  # whatever it is, the other ranks must not wait for this one
                error = e
        self.comm.fail_together(error)

    @classmethod
    def resume(cls, path, comm=None, **overrides):
        """A trainer that continues the run saved at `path` exactly where it stopped.

        Rank 0 reads the file; architecture, settings and progress reach the other ranks as JSON and
        the arrays by broadcast. `overrides` may change settings (e.g. epochs) and give an
        `optimizer` of the same kind with other hyper-parameters, but not change the network."""
        comm = comm if isinstance(comm, Comm) else Comm(comm, timeout=overrides.get("watchdog", 600.0))
        arrays, meta, error = None, None, None
        if comm.is_root:
            try:
                arrays, meta = checkpoint.load(path)
            except checkpoint.CheckpointError as e:
                error = e
        comm.fail_together(error)
        meta = comm.bcast_json(meta)
        net = Network(**meta["network"])
        # A given optimizer (e.g. a new learning rate) takes over the saved state; else the saved one.
        opt = overrides.pop("optimizer", None) or optim.make_optimizer(**meta["optimizer"])
        settings = meta["trainer"] | {k: v for k, v in overrides.items() if k != "watchdog"}
        trainer = cls(net, opt, comm=comm, **settings)
        error = None
        try:
            trainer._restore(arrays, meta["progress"])
        except ValueError as e:  # e.g. the state of another kind of optimizer: only rank 0 sees it
            error = e
        comm.fail_together(error)
        return trainer

    # ---- one step ----------------------------------------------------------------------------
    def _train_step(self, X, Y, perm, lo, hi):
        n = self.net.n_params
        lr = optim.lr_at(self.step, self.optimizer.lr, **self._lr_args)
        if self.deterministic:
            try:
                self._exact_grad_sum(X, Y, perm, lo, hi, lr)
            except exactsum.NonFiniteError:  # a NaN/Inf has no grid: found before anything is rounded
                self._diverged()
        else:
            a, b = data.shard(lo, hi, self.comm.size, self.comm.rank)
            rows = np.sort(perm[a:b])  # forward reads of a memory map; the sum does not care
            Xb, Yb = self._rows_of(X, rows), Y[rows]
            self.buf[n] = self.net.grad_sum(Xb, Yb, self.grad, divisor=hi - lo)
            self.buf[n + 1] = self.net.last_correct(Yb) or 0
            self.buf[n + 2] = 1.0 if self._stop_signal else 0.0
            if self._sharded:
                self._sum_and_update_share(lr)
            else:
                self.comm.allreduce(self.buf, what=f"step {self.step + 1}")
        if not self._sharded:
            self._update(lr)
        loss_sum, correct, stop = self.buf[n:n + _STATS]
        self.partial[0] += float(loss_sum)
        self.partial[1] += float(correct)
        self._stop_agreed = stop > 0  # a flag raised on any rank, seen by all at this same step
        if self._stop_agreed:
            self.comm.hurry(None)  # every rank is here: the checkpoint may take its time
        if self.check_every and self.step % self.check_every == 0:
            self.comm.check_agree(self.net.params, what=f"parameters after step {self.step + 1}")

    def _update(self, lr):
        """The optimizer step from the summed gradient in `buf`, after its checks and penalty."""
        if not np.isfinite(self.buf).all():  # NaN/Inf anywhere; the same verdict on every rank
            self._diverged()
        self.net.add_penalty_grad(self.grad)
        if self.clip_norm > 0:
            optim.clip_by_global_norm(self.grad, self.clip_norm)
        self.optimizer.step(self.net.params, self.grad, lr)

    def _sum_and_update_share(self, lr):
        """The step buffer summed in node shared memory; if all of it is finite, each rank updates
        its own slice of the parameters (and of the optimizer state) while the slice is in cache,
        and every rank copies the others' updated slices. The same bits as `_update` on every rank
        (every operation is element-wise), with 1/P of its memory traffic on each: the ranks no
        longer repeat the whole update on the node's shared memory bus. The optimizer state of
        the other slices goes stale on a rank; `_gather_state` makes it whole where it is read."""
        share, own, collect = self._share_update(lr)
        if not self.comm.allreduce_sharded(self.buf, own, collect, share,
                                           what=f"step {self.step + 1}"):
            self._diverged()  # NaN/Inf in the sum: no rank updated anything

    def _share_update(self, lr):
        """(share, own, collect) for Comm's sharded sums: a rank's slice of the summed gradient
        gets the penalty and, with clipping, gives its part of the global norm (share); it is
        clipped and stepped, and the new parameters are published in the slot (own); every rank
        copies the others' parameters and the statistics where they fall (collect)."""
        n, rank, clip = self.net.n_params, self.comm.rank, self.clip_norm

        def share(lo, hi, slot):
            part = slice(min(lo, n), min(hi, n))
            self.net.add_penalty_grad(slot[part], start=part.start)
            return optim.global_norm(slot[part]) if clip > 0 else 0.0

        def own(lo, hi, slot, norms):  # all of the sum is finite
            part = slice(min(lo, n), min(hi, n))
            norm = math.sqrt(sum(x * x for x in norms))  # in rank order: the same on every rank
            if clip > 0 and math.isfinite(norm) and norm > clip:
                slot[part] *= slot.dtype.type(clip / norm)
            self.optimizer.step(self.net.params, slot[:n], lr, part=part)
            slot[part] = self.net.params[part]  # what the other ranks copy

        def collect(p, lo, hi, slot):
            if p != rank:
                self.net.params[min(lo, n):min(hi, n)] = slot[min(lo, n):min(hi, n)]
            a, b = max(lo, n), min(hi, len(slot))  # the statistics, where the buffer has them
            self.buf[a:b] = slot[a:b]

        return share, own, collect

    def _gather_state(self):
        """After sharded updates, every rank's optimizer state whole again (collective)."""
        window, cuts = (self._rows, self._share_cuts) if self.deterministic else (self.buf, None)
        if self._sharded and (cuts is not None or not self.deterministic):
            for vector in self.optimizer.state.values():
                self.comm.gather_slices(window, vector, cuts, what="optimizer state")

    @contextlib.contextmanager
    def _whole_state(self):
        """fit's context: however it ends, normally or by an error raised on every rank at the
        same step (Interrupted, DivergenceError), the optimizer state is whole again after it,
        for the caller to read, save or fit again."""
        try:
            yield
        except (Interrupted, DivergenceError):
            self._gather_state()
            raise
        self._gather_state()

    def _exact_grad_sum(self, X, Y, perm, lo, hi, lr):
        """Deterministic mode: the chunks' gradient and statistics summed exactly over all ranks
        (exactsum.py): a MAX of the layers' signal bounds and the statistics' (a few thousand
        numbers), then the sum of the chunks rounded to the grid they define, in node shared
        memory (Comm.grid_sum, with a SUM of the statistics) or as one float64 MPI SUM."""
        net, n, c, size = self.net, self.net.n_params, self.chunk_size, self.comm.size
        n_chunks = -(-(hi - lo) // c)
        first, last = data.chunk_range(n_chunks, size, self.comm.rank)
        ex = self._exact_buffers()
        rows, stats, bounds = self._rows[:last - first], ex.stats[:last - first], ex.bounds
        signals = bounds[:-2]
        bounds[...] = 0
        for i, j in enumerate(range(first, last)):
            idx = np.sort(perm[lo + j * c:min(lo + (j + 1) * c, hi)])
            Xb, Yb = self._rows_of(X, idx), Y[idx]
            stats[i] = net.grad_sum(Xb, Yb, rows[i], divisor=hi - lo), net.last_correct(Yb) or 0
            np.maximum(signals, net.last_signal_maxabs(Xb), out=signals)  # propagates NaN
        bounds[-2:] = exactsum.local_maxabs(stats)
        bounds[np.isnan(bounds)] = np.inf  # an MPI MAX may drop a NaN, never an Inf
        what = f"step {self.step + 1}"
        self.comm.allreduce_max(bounds, what=f"{what} (exact sum: bounds)")
        grid = exactsum.SignalGrid(signals, ex.shapes, c, n_chunks)
        flags = ex.flags  # float64: the loss and correct sums on their grid, then the stop flag
        exactsum.encode(stats, exactsum.magic_for(bounds[-2:], n_chunks), flags[:2], ex.work)
        flags[2] = 1.0 if self._stop_signal else 0.0  # flags add exactly too
        if self.comm.sums_in_place(self._rows):
            counts = [b - a for a, b in (data.chunk_range(n_chunks, size, p) for p in range(size))]
            if self._sharded:  # each rank updates the blocks it sums, as _sum_and_update_share
                self._share_cuts = grid.owner_cuts(size)[1]
                share, own, collect = self._share_update(lr)
                if not self.comm.grid_sum_sharded(self._rows, counts, grid, own, collect, share,
                                                  what=f"{what} (exact sum)"):
                    self._diverged()  # a float32 sum overflowed: no rank updated anything
            else:
                self.comm.grid_sum(self._rows, counts, grid, self.grad, what=f"{what} (exact sum)")
            self.comm.allreduce(flags, what=f"{what} (exact sum: statistics)")
            self.buf[n:] = flags
            return
        total = self._total
        grid.encode(rows, total[:n])
        total[n:] = flags
        self.comm.allreduce(total, what=f"{what} (exact sum)")
        if total is not self.buf:
            self.buf[...] = total  # float32 nets: the one rounding of the exact sum

    def _exact_buffers(self):
        """Deterministic mode's small work arrays, allocated once."""
        if self._exact is None:
            shapes = [w.shape for w in self.net.weights]
            self._exact = SimpleNamespace(
                shapes=shapes, stats=np.empty((len(self._rows), 2)), flags=np.empty(_STATS),
                bounds=np.empty(sum(o + i for o, i in shapes) + 2),  # + |loss|, |correct|
                work=np.empty(2))
        return self._exact

    def _rows_of(self, X, idx):
        rows = np.asarray(X[idx], dtype=self.net.dtype)
        return rows if self._transform is None else self._transform(rows)

    # ---- epochs, metrics, early stopping -----------------------------------------------------
    def _end_epoch(self, n_train, val, seconds):
        self.epoch += 1
        self.batch = 0
        record = {"epoch": self.epoch, "step": self.step,
                  "loss": self.partial[0] / n_train + self.net.penalty()}
        if _is_classifier(self.net):
            record["accuracy"] = self.partial[1] / (n_train * _decisions(self.net))
        self.partial = [0.0, 0.0]
        stop = False
        if val is not None:
            val_loss, val_acc = self._evaluate(*val)
            record["val_loss"] = val_loss
            if val_acc is not None:
                record["val_accuracy"] = val_acc
            stop = self._early_stopping(val_loss)
        # the rate this epoch's last step used (not the next step's, which may never be taken)
        record["lr"] = optim.lr_at(max(self.step - 1, 0), self.optimizer.lr, **self._lr_args)
        record["seconds"] = self._root_value(seconds)  # wall time differs per rank: report rank 0's
        self.history.append(record)
        self.comm.check_agree(self.net.params, what=f"parameters after epoch {self.epoch}")
        self._gather_state()  # whole at every epoch's end, for the callback as for checkpoints
        if self.callback is not None:  # e.g. rank 0 appending to a metrics file: may fail there only
            self._together(self.callback, record)
        if self.checkpoint_dir is not None:
            self.save_checkpoint()
        return stop

    def _early_stopping(self, val_loss):
        """Decided from reduced numbers, so every rank stops after the same epoch."""
        if not self.patience:
            return False
        if val_loss < self.best["val_loss"]:
            self.best = {"val_loss": val_loss, "bad_epochs": 0}
            self.best_params = self.net.params.copy()
            return False
        self.best["bad_epochs"] += 1
        return self.best["bad_epochs"] >= self.patience

    def _blas_threads(self):
        """Threads per rank for this fit (None: leave BLAS as it is). Ranks sharing a node split its
        cores, or their GEMMs fight over them and P ranks run slower than one. Deterministic mode
        pins `threads`, else 1, whatever P is: OpenBLAS's GEMM rounding depends on the thread count
        (7 of 14 shapes tried differ between 1 and 2 threads), so runs compared must share it."""
        if self.deterministic:
            return self.threads or 1
        if not self.threads and self.comm.size > 1:
            return self.comm.blas_share()  # collective: every rank gets here alike
        return self.threads or None

    def _stopped_early(self):
        return bool(self.patience) and self.best["bad_epochs"] >= self.patience

    def _evaluate(self, X, Y):
        """Mean loss and accuracy over X, Y sharded across ranks; deterministic mode sums exactly."""
        size, rank, n = self.comm.size, self.comm.rank, len(X)
        if self.deterministic:
            c = self.chunk_size
            n_chunks = -(-n // c)
            first, last = data.chunk_range(n_chunks, size, rank)
            sums = np.zeros((last - first, 2), np.float64)
            for i, j in enumerate(range(first, last)):
                idx = np.arange(j * c, min((j + 1) * c, n))
                loss, correct = self.net.eval_sums(self._rows_of(X, idx), Y[idx])
                sums[i] = loss, correct or 0
            try:
                total = self.comm.exact_sum(sums, n_chunks, what="validation")
            except exactsum.NonFiniteError:
                total = np.full(2, np.inf)  # an infinite validation loss, as the default mode reports
        else:
            a, b = data.shard(0, n, size, rank)
            total = np.zeros(2, np.float64)
            for lo in range(a, b, self.batch_size):  # bounded memory however large the shard
                idx = np.arange(lo, min(lo + self.batch_size, b))
                loss, correct = self.net.eval_sums(self._rows_of(X, idx), Y[idx])
                total += loss, correct or 0
            self.comm.allreduce(total, what="validation")
        accuracy = float(total[1] / (n * _decisions(self.net))) if _is_classifier(self.net) else None
        return float(total[0] / n), accuracy

    # ---- start, checks, stops ----------------------------------------------------------------
    def _checked_data(self, X, y, what, scan=True):
        """Validate shapes and values; each rank checks a block of X, all fail together."""
        error = None
        try:
            if X is None or y is None:
                raise ValueError(f"{what} data: X and y are both required")
            if X.ndim != 2 or X.shape[1] != self.net.sizes[0]:
                raise ValueError(f"{what} X has shape {X.shape}; expected (N, {self.net.sizes[0]}) "
                                 f"for a network with {self.net.sizes[0]} inputs")
            if len(X) < 1:
                raise ValueError(f"{what} data is empty")
            if what == "training" and len(X) < max(self.comm.size, self.batch_size):
                raise ValueError(f"{what} data has {len(X)} samples, fewer than the batch size "
                                 f"{self.batch_size} or the {self.comm.size} ranks")
            Y = self.net.check_targets(y, len(X))
            if scan:
                a, b = data.shard(0, len(X), self.comm.size, self.comm.rank)
                data.check_finite(X, np.arange(a, b), name=f"{what} X")
        except ValueError as e:
            error = e
        self.comm.fail_together(error)
        return X, Y

    def _sync_start(self):
        """Everyone starts from rank 0's parameters and optimizer state, verified by checksum."""
        self.comm.bcast(self.net.params)
        state = self.optimizer.state_dict()  # vectors and the step count, as arrays
        for key in sorted(state):
            self.comm.bcast(state[key])
        self.optimizer.load_state_dict(state)
        if self.best_params is not None:
            self.comm.bcast(self.best_params)
        self.comm.check_agree(self.net.params, what="parameters at start")

    def _root_value(self, x):
        value = np.array([x], np.float64)
        self.comm.bcast(value)
        return float(value[0])

    def _diverged(self):
        where = f"epoch {self.epoch + 1}, step {self.step + 1}"
        saved = checkpoint.list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
        kept = (f"the last good checkpoint, {saved[-1]}, is kept" if saved
                else "no checkpoint was written before it")
        raise DivergenceError(
            f"training diverged at {where}: the loss or gradient is NaN/Inf ({kept}); lower the "
            f"learning rate (optim.lr), add gradient clipping (optim.clip_norm) or standardize "
            f"the inputs")

    def _interrupt(self):
        path = self.save_checkpoint()
        signum = self._stop_signal or signal.SIGTERM  # a peer's signal stops this rank too
        name = signal.Signals(signum).name
        where = f"epoch {self.epoch + 1}, step {self.step}"
        saved = f"checkpoint written to {path}" if path else "no checkpoint_dir, nothing saved"
        raise Interrupted(f"stopped by {name} at {where}; {saved}", signum)

    # ---- checkpoint state --------------------------------------------------------------------
    def _meta(self):
        return {
            "kind": "training",
            "network": self.net.spec(),
            "optimizer": self.optimizer.config(),
            "trainer": {"batch_size": self.batch_size, "epochs": self.epochs, "seed": self.seed,
                        "schedule": self.schedule, "clip_norm": self.clip_norm,
                        "patience": self.patience, "checkpoint_dir": _str(self.checkpoint_dir),
                        "checkpoint_every": self.checkpoint_every,
                        "keep_checkpoints": self.keep_checkpoints,
                        "deterministic": self.deterministic, "chunk_size": self.chunk_size,
                        "check_every": self.check_every, "threads": self.threads},
            "progress": {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                         "history": self.history, "partial": self.partial, "best": self.best,
                         "ranks": self.comm.size},
        }

    def _restore(self, arrays, progress):
        """Rank 0 holds the arrays; `_sync_start` in fit broadcasts them to the others."""
        for key in ("epoch", "batch", "step", "history", "partial", "best"):
            setattr(self, key, progress[key])
        if self.best["val_loss"] < math.inf:  # early stopping kept a best model: every rank needs room
            self.best_params = self.net.params.copy()
        if arrays is not None:
            self.net.params[...] = arrays["params"]
            self.optimizer.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
            if "best_params" in arrays:
                self.best_params[...] = arrays["best_params"]


class _StopOnSignals:
    """SIGTERM/SIGINT set a flag; ranks agree on it inside the next step's allreduce and stop."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _handler(self, signum, frame):
        self.trainer._stop_signal = signum
        if not self.trainer._stop_agreed:  # a late copy of the signal: the stop is under way
            grace = max(STOP_GRACE_S, 4 * self.trainer._step_s)
            self.trainer.comm.hurry(grace)  # a stalled peer must not hold the job

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()  # handlers live there only
        self.saved = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)
                      if main}

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)
        self.trainer.comm.hurry(None)  # a stop asked for too late to be agreed: training ended


def _is_classifier(net):
    return net.family in ("multinomial", "bernoulli")


def _decisions(net):
    """Classification decisions per sample: one label, or one 0/1 decision per Bernoulli output."""
    return net.sizes[-1] if net.family == "bernoulli" else 1


def _positive_int(name, value, low=1, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be an integer <= {high}, got {value!r}")
    return int(value)


def _str(path):
    return None if path is None else str(path)
