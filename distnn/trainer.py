"""`Trainer`: synchronous data-parallel training of a `Network` (or a `Recurrent`) over MPI.

Every rank holds the same parameters. The loop, per global batch of sample indices:

    my rows (data.shard) -> net.grad_sum(..., divisor=B) -> stepper: sum across ranks + update
    -> verdict (finite? loss, correct, stop) -> metrics, stopping, checkpoints

The stepper (step.py) is chosen once, here: the whole allreduce, the node-sharded update, or the
exact (deterministic) sum, so P ranks compute what 1 rank computes on the same global batches, up
to the order of floating-point additions, or to the bit with `deterministic=True`.

The data order comes from `data.epoch_permutation(seed, epoch)`, so a checkpoint needs only
(epoch, batch, step) and the parameters and optimizer state to continue bit-identically.
Only rank 0 writes files; every rank returns the same `history`.

A `Recurrent` trains alike, on X (N, T, d) with `lengths`: its targets are `recurrent.Targets`, the
encoded targets with the lengths, so that the batches' rows pick both; the loss divisor counts
targets (Σ lengths for targets="every"), and the deterministic grid a chunk's c T rows.
"""
import contextlib
import signal
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from . import checkpoint, data, exactsum, families, optim, step
from .model import build
from .comm import connect
from .network import Network
from .recurrent import Recurrent, check_finite_steps
from .stopping import DivergenceError, EarlyStopping, Interrupted, StopRequest, diverged
from .threads import threads_in_force

__all__ = ["Trainer", "DivergenceError", "Interrupted"]
# The settings a checkpoint keeps (with patience and checkpoint_dir): Trainer.resume passes them back
SETTINGS = ("batch_size", "epochs", "seed", "schedule", "clip_norm", "checkpoint_every",
            "keep_checkpoints", "deterministic", "chunk_size", "check_every", "threads", "shuffle",
            "bptt")


class Trainer:
    """Trains `net` data-parallel; `comm` None -> MPI.COMM_WORLD (a plain run is size 1).

    `update`: "auto" (each rank updates its share where the ranks share a node), "sharded" or
    "whole" (every rank updates everything); the same bits wherever the sum runs in node shared
    memory (every rank adds in rank order there)."""

    def __init__(self, net, optimizer=None, batch_size=256, epochs=20, seed=0, comm=None, *,
                 schedule=None, clip_norm=0.0, patience=0, checkpoint_dir=None, checkpoint_every=0,
                 keep_checkpoints=3, deterministic=False, chunk_size=64, watchdog=600.0,
                 bucket_bytes=4 << 20, check_every=100, threads=None, callback=None,
                 update="auto", stop=None, shuffle=True, bptt=None):
        if not isinstance(net, (Network, Recurrent)):
            raise TypeError(f"net must be a distnn.Network or Recurrent, got {type(net).__name__}")
        update = step.checked_update(update)
        # truncated BPTT: back-propagate within windows of `bptt` steps (0: the whole sequence);
        # a Recurrent's own setting, which None leaves as it is
        if bptt is not None and (bptt or isinstance(net, Recurrent)):
            if not isinstance(net, Recurrent):
                raise ValueError(f"bptt is for a Recurrent network; a Network has no time steps, "
                                 f"got bptt={bptt!r}")
            net.bptt = _positive_int("bptt", bptt, low=0)
        self.net = net
        self.optimizer = optimizer if optimizer is not None else optim.SGD(lr=0.01)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.epochs = _positive_int("epochs", epochs, low=0)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)  # False: every epoch takes the rows in their order
        self.schedule = dict(schedule or {})  # keyword arguments of optim.lr_at
        self.clip_norm = float(clip_norm)
        self.early = EarlyStopping(_positive_int("patience", patience, low=0))
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every, low=0)
        self.keep_checkpoints = _positive_int("keep_checkpoints", keep_checkpoints)
        self.deterministic = bool(deterministic)
        self.chunk_size = _positive_int("chunk_size", chunk_size, high=exactsum.MAX_CHUNK_SIZE)
        self.check_every = _positive_int("check_every", check_every, low=0)
        # called on every rank with each epoch's record; a true return (the same on every rank:
        # the record is) stops training after that epoch
        self.callback = callback
        # BLAS threads per rank during fit; None or 0: the node's cores / its ranks
        self.threads = None if threads is None else _positive_int("threads", threads, low=0)
        # watchdog: seconds a collective may wait for the other ranks before the job is aborted
        # (a rank that stalled or left); None turns it off
        self.comm = connect(comm, timeout=watchdog, bucket_bytes=bucket_bytes)
        self._own_comm = self.comm is not comm  # close() closes a Comm made here
        # Progress, all of it in the checkpoint: the run continues from exactly here.
        self.epoch = 0  # completed epochs
        self.batch = 0  # completed batches of the current epoch
        self.step = 0  # completed optimizer steps
        self.history = []  # one record per completed epoch, identical on every rank
        self.partial = [0.0, 0.0]  # loss and correct sums of the current epoch so far
        self.optimizer.init(net.params)
        self.stepper = step.make(net, self.optimizer, self.comm, clip_norm=self.clip_norm,
                                 update=update, deterministic=self.deterministic,
                                 chunk_size=self.chunk_size, batch_size=self.batch_size)
        # stop: a StopRequest whose signal handlers the caller installed for longer than a fit
        # (the command line's, from launch to exit); None: fit handles SIGTERM/SIGINT itself
        self.stop = stop if stop is not None else StopRequest()
        self.stop.comm = self.comm
        self.closed = False
        self._lr_args = {"total_steps": 1} | self.schedule  # fit sets its own total_steps
        self._transform = None  # fit's and evaluate's rows -> rows
        self._loss_divisor = None  # fit's training targets, or their Σ sample weight
        # the class labels of a labels family's outputs when fit was given labels that are not
        # output indices 0..K-1 (strings, say): the sorted unique labels, as the CLI encodes them
        self.classes = None

    # ---- the public surface ------------------------------------------------------------------
    @property
    def bptt(self):
        """A Recurrent's truncated BPTT window (0: whole sequences); None for a Network."""
        return self.net.bptt if isinstance(self.net, Recurrent) else None

    def fit(self, X, y, X_val=None, y_val=None, transform=None, scan=True, sample_weight=None, *,
            lengths=None, lengths_val=None):
        """Train on rows of X, y (this process's view of the whole data set; memory-maps, lists
        and pandas welcome). Class labels other than output indices (strings, say) are encoded
        by their sorted unique values, which `classes` keeps.

        `transform(rows) -> rows`, if given, maps each gathered batch of X (e.g. standardization).
        scan=False skips the NaN/Inf scan of X for a caller that made it already (one pass over
        a large memory map); shapes and targets are checked either way.
        `sample_weight` (N,), finite and >= 0: each batch's loss and gradient are Σ w·loss / Σ w
        over its samples, and each epoch's loss Σ w·loss / Σ w over the training set (accuracy
        still counts samples; validation is unweighted).
        A Recurrent takes X (N, T, d) and `lengths` (N,) in 1..T (None: every sequence has T
        steps), and `lengths_val` for X_val; its weights count for each of a sequence's targets.
        Returns `history`, a list of per-epoch dicts of reduced metrics, the same on every rank."""
        if self.closed:
            raise RuntimeError("this Trainer was closed; make a new one (or Trainer.resume) to train")
        X = _array(X)
        if self.comm.size <= len(X) < self.batch_size:  # as scikit-learn: clipped to the data
            if self.comm.is_root:
                warnings.warn(f"batch_size {self.batch_size} is more than the {len(X)} training "
                              f"samples: each step takes all {len(X)}", UserWarning, stacklevel=2)
            self.batch_size = len(X)  # smaller than the one the stepper was sized for: fits
        X, Y = self._checked_data(X, self._codes(y), "training", scan, lengths)
        val = (None if X_val is None else
               self._checked_data(_array(X_val), self._codes(y_val), "validation", scan,
                                  lengths_val))
        W = self.comm.together(_checked_weights, sample_weight, len(X), self.net.dtype,
                               catch=(ValueError,))
        counts = _counts(Y)  # targets per sample: None (1 each), or a sequence's
        self._loss_divisor = (_n_targets(Y) if W is None else float(W.sum(dtype=np.float64))
                              if counts is None else float(W.astype(np.float64) @ counts))
        self._transform = transform
        self._sync_start()
        batches = data.batches(len(X), self.batch_size)
        # total_steps follows this fit's epochs (a resumed run may be given more), unless set
        self._lr_args = {"total_steps": max(1, self.epochs * len(batches))} | self.schedule
        blas = _blas_threads(self.deterministic, self.threads, self.comm)
        self.optimizer.threads = blas or threads_in_force()  # the update uses the GEMMs' cores
        with self.stop.watching(), threadpool_limits(blas, user_api="blas"), self._whole_state():
            while self.epoch < self.epochs and not self.early.stopped:
                started = time.perf_counter()
                perm = (data.epoch_permutation(self.seed, self.epoch, len(X)) if self.shuffle
                        else np.arange(len(X)))
                while self.batch < len(batches):
                    lo, hi = batches[self.batch]
                    step_started = time.perf_counter()
                    with self.comm.urgent():  # after a stop request, a stalled peer ends the job
                        self.train_batch(X, Y, perm[lo:hi], transform, W)
                    self.stop.step_s = time.perf_counter() - step_started
                    self.batch += 1
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.stop.agreed:
                        raise self.stop.interrupted(f"epoch {self.epoch + 1}, step {self.step}",
                                                    self.save_checkpoint())
                if self._end_epoch(_n_targets(Y), val, time.perf_counter() - started):
                    break
        if self.early.patience and self.early.params is not None:
            self.net.params[...] = self.early.params  # early stopping keeps the best model
        return self.history

    def train_batch(self, X, Y, rows, transform=None, weights=None):
        """One synchronized step on the global batch `rows` of X, Y (Y as net.check_targets
        gives it, `weights` None or (N,) in the net's dtype; every rank passes the same rows and
        computes its own part). Raises DivergenceError on every rank if the sum is not finite;
        returns the step's Verdict."""
        lr = optim.lr_at(self.step, self.optimizer.lr, **self._lr_args)
        batch = step.Batch(X, Y, rows, self.net.dtype, transform, weights)
        verdict = self.stepper(batch, lr, self.stop.signum, what=f"step {self.step + 1}")
        if not verdict.finite:
            raise diverged(f"epoch {self.epoch + 1}, step {self.step + 1}", self._checkpoints(),
                           self.history)
        self.partial[0] += verdict.loss
        self.partial[1] += verdict.correct
        self.stop.agree(verdict.stop)  # a stop asked on any rank, seen by all at this same step
        if self.check_every and self.step % self.check_every == 0:
            self.comm.check_agree(self.net.params, what=f"parameters after step {self.step + 1}")
        self.step += 1
        return verdict

    def evaluate(self, X, y, transform=None, lengths=None):
        """(mean loss without penalty, accuracy or None) over all ranks' shards of X, y (and the
        sequences' lengths, for a Recurrent)."""
        X, Y = self._checked_data(_array(X), self._codes(y), "evaluation", lengths=lengths)
        with threadpool_limits(_blas_threads(self.deterministic, self.threads, self.comm), user_api="blas"):  # as fit: deterministic pins
            return self._evaluate(X, Y, transform)

    def close(self):
        """Give back the shared memory of the step buffers, and the Comm if this trainer made it
        (collective). The trainer cannot train afterwards; its network and history stay."""
        if not self.closed:
            self.stepper.close()
            self.closed = True
        if self._own_comm:
            self.comm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def to_model(self):
        """The trained model (network, class labels) that `distnn.save_model` writes, as
        `distnn train` does; a `transform` is not part of it."""
        from .model import Model

        classes = self.classes
        if classes is None and families.FAMILIES[self.net.family].labels:
            classes = np.arange(self.net.sizes[-1])  # labels were the output indices
        return Model(self.net, None, classes)

    def request_stop(self, signum=None):
        """Ask every rank to stop after the next step, as SIGTERM does (on this rank alone)."""
        self.stop.ask(signum or signal.SIGTERM)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, path):
        """Write the full training state to `path` (rank 0 writes; every rank must call)."""
        if not self.closed:  # else fit left the state whole
            self.stepper.gather_state()
        arrays = {"params": self.net.params}
        arrays |= {f"opt/{k}": v for k, v in self.optimizer.state_dict().items()}
        if self.early.params is not None:
            arrays["best_params"] = self.early.params
        self.comm.together(checkpoint.save, path, arrays, _meta(self), root_only=True)

    def save_checkpoint(self):
        """Save into checkpoint_dir as ckpt-<step>.npz and keep the newest `keep_checkpoints`."""
        if self.checkpoint_dir is None:
            return None
        path = checkpoint.checkpoint_path(self.checkpoint_dir, self.step)
        self.save(path)
        self.comm.together(checkpoint.prune, self.checkpoint_dir, self.keep_checkpoints,
                           root_only=True)
        return path

    @classmethod
    def resume(cls, path, comm=None, **overrides):
        """A trainer that continues the run saved at `path` exactly where it stopped.

        Rank 0 reads the file; architecture, settings and progress reach the other ranks as JSON and
        the arrays by broadcast. `overrides` may change settings (e.g. epochs) and give an
        `optimizer` of the same kind with other hyper-parameters, but not change the network."""
        comm = connect(comm, timeout=overrides.get("watchdog", 600.0))
        loaded = comm.together(checkpoint.load, path, root_only=True,
                               catch=(checkpoint.CheckpointError,))
        arrays, meta = loaded if loaded is not None else (None, None)
        meta = comm.bcast_json(meta)
        net = build(meta["network"])
        # A given optimizer (e.g. a new learning rate) takes over the saved state; else the saved one.
        opt = overrides.pop("optimizer", None) or optim.make_optimizer(**meta["optimizer"])
        settings = meta["trainer"] | {k: v for k, v in overrides.items() if k != "watchdog"}
        trainer = cls(net, opt, comm=comm, **settings)
        # e.g. the state of another kind of optimizer: only rank 0, which holds the arrays, sees it
        comm.together(trainer._restore, arrays, meta["progress"], catch=(ValueError,))
        return trainer

    def _restore(self, arrays, progress):
        """Rank 0 holds the arrays; `_sync_start` in fit broadcasts them to the others."""
        for key in ("epoch", "batch", "step", "history", "partial"):
            setattr(self, key, progress[key])
        self.early.best = progress["best"]
        if self.early.best["val_loss"] < float("inf"):  # a best model was kept: every rank needs room
            self.early.params = self.net.params.copy()
        if arrays is not None:
            self.net.params[...] = arrays["params"]
            self.optimizer.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
            if "best_params" in arrays:
                self.early.params[...] = arrays["best_params"]

    def _checkpoints(self):
        return checkpoint.list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []

    # ---- epochs, metrics ---------------------------------------------------------------------
    def _end_epoch(self, n_train, val, seconds):
        """Close an epoch: its record, validation, early stopping, callback, checkpoint; whether
        to stop."""
        self.epoch += 1
        self.batch = 0
        record = {"epoch": self.epoch, "step": self.step,
                  "loss": self.partial[0] / (self._loss_divisor or n_train) + self.net.penalty()}
        if self.net.is_classifier:
            record["accuracy"] = self.partial[1] / (n_train * self.net.decisions)
        self.partial = [0.0, 0.0]
        stop = False
        if val is not None:
            val_loss, val_acc = self._evaluate(*val, self._transform)
            record["val_loss"] = val_loss
            if val_acc is not None:
                record["val_accuracy"] = val_acc
            stop = self.early.update(val_loss, self.net.params)
        # the rate this epoch's last step used (not the next step's, which may never be taken)
        record["lr"] = optim.lr_at(max(self.step - 1, 0), self.optimizer.lr, **self._lr_args)
        record["seconds"] = _root_value(self.comm, seconds)  # wall time differs per rank: rank 0's
        self.history.append(record)
        self.comm.check_agree(self.net.params, what=f"parameters after epoch {self.epoch}")
        self.stepper.gather_state()  # whole at every epoch's end, for the callback and checkpoints
        if self.callback is not None:  # e.g. rank 0 appending to a metrics file: may fail there only
            stop = bool(self.comm.together(self.callback, record)) or stop
        if self.checkpoint_dir is not None:
            self.save_checkpoint()
        return stop

    def _evaluate(self, X, Y, transform):
        """Mean loss and accuracy over X, Y sharded across ranks."""
        total = self.stepper.evaluate_sums(X, Y, transform, self.batch_size)
        n = _n_targets(Y)
        accuracy = (float(total[1] / (n * self.net.decisions)) if self.net.is_classifier
                    else None)
        return float(total[0] / n), accuracy

    @contextlib.contextmanager
    def _whole_state(self):
        """fit's context: however it ends, normally or by an error raised on every rank at the
        same step (Interrupted, DivergenceError), the optimizer state is whole after it, for the
        caller to read, save or fit again."""
        try:
            yield
        except (Interrupted, DivergenceError):
            self.stepper.gather_state()
            raise
        self.stepper.gather_state()

    # ---- start and checks --------------------------------------------------------------------
    def _codes(self, y):
        """y as a labels family's output indices: labels that are not indices already are
        encoded by `classes` (set from the first such y, sorted unique values)."""
        if y is None or not families.FAMILIES[self.net.family].labels or isinstance(
                self.net, Recurrent):  # a sequence's labels are output indices
            return None if y is None else _array(y)
        y = _array(y)
        if self.classes is None and _are_indices(y):
            return y
        if self.classes is None:
            codes, classes = data.encode_labels(y, name="y")
            if len(classes) != self.net.sizes[-1]:
                raise ValueError(f"y has {len(classes)} class labels {classes.tolist()[:6]}, the "
                                 f"network {self.net.sizes[-1]} outputs; give it one per class")
            self.classes = classes
            return codes
        from .model import Model

        return Model(self.net, None, self.classes).targets(y)

    def _checked_data(self, X, y, what, scan=True, lengths=None):
        """Validate shapes and values; each rank checks a block of X, all fail together."""
        batch = self.batch_size if what == "training" else None  # training needs whole batches
        if lengths is not None and not isinstance(self.net, Recurrent):
            raise ValueError(f"{what} lengths are for a Recurrent network's sequences")
        chunk = self.chunk_size if self.deterministic else None
        return self.comm.together(_checked, self.net, X, y, what, batch, self.comm, scan, lengths,
                                  chunk, catch=(ValueError,))

    def _sync_start(self):
        """Everyone starts from rank 0's parameters and optimizer state, verified by checksum."""
        self.comm.bcast(self.net.params)
        state = self.optimizer.state_dict()  # vectors and the step count, as arrays
        for key in sorted(state):
            self.comm.bcast(state[key])
        self.optimizer.load_state_dict(state)
        if self.early.params is not None:
            self.comm.bcast(self.early.params)
        self.comm.check_agree(self.net.params, what="parameters at start")


def _array(a):
    """Lists and pandas objects as numpy arrays; arrays, memory maps and row views as they are."""
    if hasattr(a, "to_numpy"):
        return a.to_numpy()
    return a if hasattr(a, "shape") and hasattr(a, "__getitem__") else np.asarray(a)


def _are_indices(y):
    """Whether labels y are integers (or integral floats) already, as output indices."""
    y = np.asarray(y)
    if y.dtype.kind in "biu":
        return True
    return y.dtype.kind == "f" and bool(np.all(np.isfinite(y) & (y == np.round(y))))


def _checked_weights(w, n, dtype):
    """Sample weights as an (n,) array of `dtype`, or None; finite, >= 0, not all 0."""
    if w is None:
        return None
    w = np.asarray(_array(w))
    if w.dtype.kind not in "biuf" or w.shape != (n,):
        raise ValueError(f"sample_weight must be {n} numbers, one per sample; got shape {w.shape} "
                         f"dtype {w.dtype}")
    w = w.astype(dtype)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"sample_weight must be finite and >= 0; sample {i} has {w[i].item()!r}")
    if not w.any():
        raise ValueError("sample_weight is 0 for every sample: there is nothing to fit")
    return w


def _blas_threads(deterministic, threads, comm):
    """Threads per rank for this fit (None: leave BLAS as it is). Ranks sharing a node split its
    cores, or their GEMMs fight over them and P ranks run slower than one. Deterministic mode
    pins `threads`, else 1, whatever P is: OpenBLAS's GEMM rounding depends on the thread count
    (7 of 14 shapes tried differ between 1 and 2 threads), so runs compared must share it."""
    if deterministic:
        return threads or 1
    if not threads and comm.size > 1:
        return comm.blas_share()  # collective: every rank gets here alike
    return threads or None


def _root_value(comm, x):
    """Rank 0's number x on every rank."""
    value = np.array([x], np.float64)
    comm.bcast(value)
    return float(value[0])


def _meta(trainer):
    """A checkpoint's JSON: the network, optimizer, settings and progress of `trainer`."""
    return {
        "kind": "training",
        "network": trainer.net.spec(),
        "optimizer": trainer.optimizer.config(),
        "trainer": {key: getattr(trainer, key) for key in SETTINGS}
                   | {"patience": trainer.early.patience,
                      "checkpoint_dir": _str(trainer.checkpoint_dir)},
        "progress": {"epoch": trainer.epoch, "batch": trainer.batch, "step": trainer.step,
                     "history": trainer.history, "partial": trainer.partial,
                     "best": trainer.early.best, "ranks": trainer.comm.size},
    }


def _checked(net, X, y, what, batch_size, comm, scan, lengths=None, chunk_size=None):
    """(X, Y) after the checks of shapes and targets, and of this rank's block of X."""
    if X is None or y is None:
        raise ValueError(f"{what} data: X and y are both required")
    if isinstance(net, Recurrent):
        return _checked_sequences(net, X, y, what, batch_size, comm, scan, lengths, chunk_size)
    if X.ndim != 2 or X.shape[1] != net.sizes[0]:
        raise ValueError(f"{what} X has shape {X.shape}; expected (N, {net.sizes[0]}) "
                         f"for a network with {net.sizes[0]} inputs")
    _enough(X, what, batch_size, comm)
    Y = net.check_targets(y, len(X))
    if scan:
        a, b = data.shard(0, len(X), comm.size, comm.rank)
        data.check_finite(X, np.arange(a, b), name=f"{what} X")
    return X, Y


def _checked_sequences(net, X, y, what, batch_size, comm, scan, lengths, chunk_size=None):
    """_checked for a Recurrent: X (N, T, d), lengths, targets; this rank's block of X scanned
    for NaN/Inf at the steps that exist. chunk_size: deterministic mode's, whose c T rows the
    grid bounds."""
    if X.ndim != 3 or X.shape[2] != net.sizes[0] or X.shape[1] < 1:
        raise ValueError(f"{what} X has shape {X.shape}; expected (N, T, {net.sizes[0]}): "
                         f"sequences of T >= 1 steps of {net.sizes[0]} inputs")
    if chunk_size and chunk_size * X.shape[1] > exactsum.MAX_CHUNK_SIZE:
        raise ValueError(f"deterministic mode: chunk_size {chunk_size} x {X.shape[1]} steps is "
                         f"more than {exactsum.MAX_CHUNK_SIZE} rows a chunk; use smaller chunks")
    _enough(X, what, batch_size, comm)
    Y = net.check_targets(y, len(X), lengths, X.shape[1])
    if scan:
        a, b = data.shard(0, len(X), comm.size, comm.rank)
        check_finite_steps(X, Y.lengths, np.arange(a, b), name=f"{what} X")
    return X, Y


def _enough(X, what, batch_size, comm):
    if len(X) < 1:
        raise ValueError(f"{what} data is empty")
    if batch_size is not None and len(X) < max(comm.size, batch_size):
        raise ValueError(f"{what} data has {len(X)} samples, fewer than the batch size "
                         f"{batch_size} or the {comm.size} ranks")


def _counts(Y):
    """Targets per sample (N,) of a sequence model's Targets; None: one each."""
    return Y.counts() if hasattr(Y, "counts") else None


def _n_targets(Y):
    """How many targets Y holds: its samples, or a sequence model's Σ targets."""
    return Y.total if hasattr(Y, "total") else len(Y)


def _positive_int(name, value, low=1, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be an integer <= {high}, got {value!r}")
    return int(value)


def _str(path):
    return None if path is None else str(path)
