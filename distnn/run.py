"""One training run, the same code on every rank: `distnn train` (cli.py) calls train(args, comm).

Every rank loads the config and the data, checks and splits it, fits the standardization (moments
summed exactly across ranks), builds the network or resumes the newest checkpoint that loads, then
fits; rank 0 alone writes the run directory (rundir.py) and reports progress (progress.py). A user
error (USER_ERRORS) on any rank is raised on every rank, so the command line reports it once;
divergence and signals are the trainer's (DivergenceError, Interrupted).
"""
from __future__ import annotations

import functools
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config, data, families, network, optim, progress, rundir
from .data import DataError, Standardizer
from .errors import USER_ERRORS, UsageError, warn
from .model import Model
from .network import Network


def load_train_config(args) -> config.Config:
    """The config file with --set overrides applied and --out as its out_dir."""
    cfg = config.load_config(args.config, overrides=args.set)
    if args.out is not None:
        if not args.out.strip():
            raise UsageError("--out: expected a directory, got an empty string")
        cfg.out_dir = args.out
    rundir.check_out_dir(cfg.out_dir, "--out" if args.out is not None else "out_dir")
    return cfg


# ------------------------------------------------------------------------------------- train

def train(args, comm, stop) -> int:
    """Every rank: config, data, standardization, network, then fit; rank 0 writes the run dir.
    A signal (recorded by `stop`) ends the set-up at the next stage with Interrupted on every
    rank, the training at the next step with a checkpoint; after the last step the run finishes."""
    from .trainer import Trainer

    started = time.perf_counter()
    cfg = _stage(comm, stop, "while loading the config", load_train_config, args)
    comm.configure(timeout=cfg.train.watchdog or math.inf,  # 0: no deadline but a stop's grace
                   bucket_bytes=cfg.train.bucket_mb * 2**20)
    n_threads, pinned = _blas_threads(args.threads, cfg.train, comm)
    for line in _wasteful(comm, cfg.train, n_threads):
        warn(line)
    if cfg.privacy.dp() is not None and cfg.data.standardize and comm.is_root:
        warn("data.standardize with [privacy]: the training rows' per-feature mean and std are "
             "not private (the model file keeps them); set data.standardize = false where the "
             "features' ranges are known")
    job = _stage(comm, stop, "while loading the data", prepare, cfg, comm.rank, comm.size)
    comm.allreduce(job.crcs, what="data checksum")  # every block's crc32, on every rank
    fingerprint = data.fingerprint(job.dataset, job.classes, job.crcs)
    exact_sum = functools.partial(comm.exact_sum, what="standardization")  # names a stall
    scaler = (Standardizer.fit(*job.scaled_rows(), rank=comm.rank, size=comm.size,
                               exact_sum=exact_sum) if cfg.data.standardize else None)
    run = rundir.RunDir(cfg.out_dir, comm)
    with run.locked():  # before anything in the run directory is read or touched
        # only rank 0 reports, but the trainer calls its callback on every rank
        log = (progress.EpochLog(run.path / rundir.METRICS, cfg.train.epochs) if comm.is_root
               else progress.Silent())
        settings = trainer_settings(cfg, run.path / rundir.CHECKPOINTS, log) | pinned
        resume_from = run.checkpoint_to_resume() if args.resume else None
        if resume_from is None:
            run.may_start_afresh(args)
            trainer = Trainer(job.net, make_optimizer(cfg.optim), comm=comm, stop=stop, **settings)
            if args.resume:
                run.say_resuming(None, trainer)
        else:
            trainer = Trainer.resume(resume_from, comm=comm, optimizer=make_optimizer(cfg.optim),
                                     stop=stop, **settings)
            rundir.same_network(resume_from, trainer.net, job.net)
            run.may_resume(resume_from, cfg, fingerprint)
            run.say_resuming(resume_from, trainer)
        stop.check("before training started; the run directory is as it was")
        run.start(cfg, fingerprint, trainer.history, fresh=resume_from is None)
        # NaN/Inf is the trainer's to report (one message naming the step), not numpy's warnings
        with log.showing(trainer.epoch), np.errstate(all="ignore"):
            trainer.fit(_Rows(job.X, job.train), job.y[job.train], *job.val_split(),
                        transform=None if scaler is None else scaler.transform,
                        scan=False,  # prepare() scanned every row of X already
                        **job.fit_lengths())
        done = {"epochs": trainer.epoch, "steps": trainer.step, "ranks": comm.size,
                "threads": trainer.threads or 1 if cfg.train.deterministic else n_threads,
                "last": trainer.history[-1] if trainer.history else None}
        if trainer.privacy is not None:  # ε spent, at δ: only the model is private
            done["privacy"] = trainer.privacy_record()
        run.finish(Model(trainer.net, scaler, job.classes, job.meta(cfg)), done, started,
                   job.scores)
        if stop.signum and comm.is_root:
            print(f"distnn: {signal.Signals(stop.signum).name} came after the last step; the run "
                  f"finished", file=sys.stderr, flush=True)
        return 0


def _stage(comm, stop, where, fn, *args):
    """fn(*args) on every rank, work of this rank alone that a signal cuts short; its result.
    A user error on any rank is raised on every rank, and so is a stop (Interrupted)."""
    result = comm.together(stop.interruptible(fn), *args, catch=USER_ERRORS)
    stop.check(f"{where}; nothing was trained or written")
    return result


def resume_hint(args, out_dir, ranks) -> str | None:
    """'continue with: <the command line that resumes the run>' when out_dir has a checkpoint
    to resume from, else None."""
    from .checkpoint import list_checkpoints

    if not list_checkpoints(Path(out_dir) / rundir.CHECKPOINTS):  # which one loads, --resume finds
        return None
    words = ["distnn", "train", args.config, "--out", str(out_dir), "--resume",
             *(f"--set={s}" for s in args.set)]
    if args.threads is not None:
        words.append(f"--threads={args.threads}")
    command = shlex.join(words)
    if os.environ.get(rundir.RUN_TOKEN) or args.np > 1:  # started by `distnn train -n`
        command += f" -n {ranks}"
    elif ranks > 1:
        command = f"mpiexec -n {ranks} {command}"
    return f"continue with: {command}"


def _blas_threads(given, tc, comm):
    """(BLAS threads per rank now in force, the Trainer's `threads` setting): --threads, else
    train.threads, else the node's cores shared among its ranks."""
    from . import threads

    given = given if given is not None else tc.threads
    if tc.deterministic:  # the same threads at any P (GEMM rounding depends on the count):
        pinned = {"threads": given} if given else {}  # 1, or what a resumed checkpoint ran with
        return threads.limit_blas_threads(given or 1), pinned
    n = threads.limit_blas_threads(given or comm.blas_share())
    return n, {"threads": n}


def _wasteful(comm, tc, threads) -> list[str]:
    """What in these settings runs but wastes the machine, for rank 0 to say (collective)."""
    ranks, cpus = comm.node()
    found = []
    if ranks > cpus:
        found.append(f"{ranks} ranks share the {cpus} cores of this node: every step waits for "
                     f"cores, slower than {cpus} ranks would be; start at most {cpus} per node")
    elif threads * ranks > cpus:
        found.append(f"{threads} BLAS threads x {ranks} ranks on {cpus} cores: the threads "
                     f"compete for them; use --threads {max(1, cpus // ranks)}, or 0 (the "
                     f"default) to share the cores")
    if tc.batch_size < comm.size:
        found.append(f"train.batch_size {tc.batch_size} over {comm.size} ranks leaves "
                     f"{comm.size - tc.batch_size} of them without samples in every step; use a "
                     f"batch of at least {comm.size}, or fewer ranks")
    return found if comm.is_root else []


# ------------------------------------------------------------------------ data and the network

@dataclass
class Job:
    """What every rank prepared from the config: data, split, encoded targets and a fresh network."""

    X: np.ndarray            # (N, d), the whole source (a memory map for .npz/.npy)
    y: np.ndarray            # (N,) or (N, K) targets as the network takes them
    labels: np.ndarray       # (N,) or (N, K) targets as the source has them
    train: np.ndarray        # sorted row indices
    val: np.ndarray          # sorted row indices, maybe empty
    classes: np.ndarray | None
    dataset: data.Dataset
    test: tuple | None       # (X, labels, lengths or None) of data.test_source
    net: Network             # or a Recurrent (model.kind = "recurrent")
    crcs: np.ndarray         # (blocks,) int64: crc32 of the blocks of X this rank read, else 0
    lengths: np.ndarray | None = None  # sequences of variable length: (N,) steps of each

    def scaled_rows(self):
        """(X, rows) that standardization fits on: the training rows; for sequences, every step
        of them that exists (padding counts for nothing)."""
        if self.X.ndim == 2:
            return self.X, self.train
        return data.Steps(self.X, self.train, self.lengths), None

    def fit_lengths(self) -> dict:
        """Trainer.fit's lengths of the training and validation sequences, if they vary."""
        if self.lengths is None:
            return {}
        return {"lengths": self.lengths[self.train],
                "lengths_val": self.lengths[self.val] if len(self.val) else None}

    def val_split(self):
        """(X_val, y_val) for Trainer.fit, or (None, None) without validation rows."""
        if len(self.val) == 0:
            return None, None
        return _Rows(self.X, self.val), self.y[self.val]

    def scores(self, model) -> dict:
        """The final scores done.json records: on the validation rows and on the test set."""
        scores = {}
        if len(self.val):
            scores["val"] = model.scores(_Rows(self.X, self.val), self.labels[self.val],
                                         **_lengths_of(self.lengths, self.val))
        if self.test is not None:
            X, y, lengths = self.test
            scores["test"] = model.scores(X, y, **_lengths_of(lengths))
        return scores

    def meta(self, cfg) -> dict:
        """Facts the model file keeps besides the network."""
        ds = self.dataset
        return {"source": ds.source, "target": cfg.data.target or ds.target_name,
                "features": ds.feature_names, "config": config.to_dict(cfg)}


def prepare(cfg, rank, size) -> Job:
    """Load, check and split the data and build the network; the same on every rank."""
    dc, mc = cfg.data, cfg.model
    ds = data.load(dc.source, target=dc.target or None, features=dc.features or None,
                   steps=dc.steps)
    _check_kind(ds, mc)
    # each rank checks its blocks (all fail together) and checksums them in the same read
    crcs = data.scan(ds.X, rank, size, name=f"{ds.source}: X", lengths=ds.lengths)
    y, classes = (_encoded_targets(ds, mc.family, rank) if ds.X.ndim == 2 else
                  _sequence_targets(ds, mc, rank))
    per_target = y.shape[2:] if ds.X.ndim == 3 and mc.targets == "every" else y.shape[1:]
    n_out = len(classes) if families.FAMILIES[mc.family].labels else (
        per_target[0] if per_target else 1)
    net = _network([ds.n_features, *mc.hidden, n_out], mc, cfg.train.seed)
    try:
        y = _check_targets(net, y, ds)  # targets that do not fit the family fail here
    except ValueError as e:
        raise DataError(f"{ds.source}: target '{ds.target_name}': {e}") from None
    train_rows, val_rows = data.train_val_split(len(ds.X), dc.val_fraction, cfg.train.seed)
    if len(train_rows) < max(size, cfg.train.batch_size):
        raise DataError(f"{ds.source}: {len(train_rows)} training rows, fewer than train.batch_size "
                        f"{cfg.train.batch_size} or the {size} ranks")
    test = None
    if dc.test_source:
        t = _test_set(dc.test_source, dc.target, ds, dc.steps)
        try:
            Model(net, None, classes).targets(t.y, **_lengths_of(t.lengths))  # labels the
        except ValueError as e:                                              # model cannot know
            raise DataError(f"{t.source}: target '{t.target_name}': {e}") from None
        test = (t.X, t.y, t.lengths)
    make_optimizer(cfg.optim)  # bad hyper-parameters fail before anything starts
    return Job(ds.X, y, ds.y, train_rows, val_rows, classes, ds, test, net, crcs, ds.lengths)


# --------------------------------------------------------------------------- sequences (issue 18)

def _check_kind(ds, mc) -> None:
    """Sequences (N, T, d) go to a recurrent model, rows (N, d) to a dense one."""
    if ds.X.ndim == 3 and mc.kind != "recurrent":
        raise DataError(f"{ds.source}: X holds sequences, shape {ds.X.shape} (N, T, d); a dense "
                        f"model takes rows (N, d): set model.kind = \"recurrent\" and model.state "
                        f"to train on sequences")
    if ds.X.ndim == 2 and mc.kind == "recurrent":
        raise DataError(f"{ds.source}: X has shape {ds.X.shape} (N, d); a recurrent model takes "
                        f"sequences (N, T, d): a 3-D X, or data.steps to read each row as steps")


def _sequence_targets(ds, mc, rank):
    """(y as the recurrent model takes it, class labels or None). targets = "every": y (N, T) or
    (N, T, K), the padded steps zeroed (never scored, so never checked) and class labels encoded
    from the steps that exist; "last": one target per sequence, as for rows."""
    n, steps = ds.X.shape[:2]
    if mc.targets == "last":
        per_step = ds.y.ndim == 3 or (ds.y.ndim == 2 and families.FAMILIES[mc.family].labels)
        if per_step and ds.y.shape[1] == steps:
            raise DataError(f"{ds.source}: target '{ds.target_name}' has shape {ds.y.shape}, one "
                            f"per step; model.targets = \"last\" takes one per sequence, ({n},) "
                            f"or ({n}, K): set model.targets = \"every\" for a target per step")
        return _encoded_targets(ds, mc.family, rank)
    if ds.y.ndim < 2 or ds.y.shape[1] != steps:
        raise DataError(f"{ds.source}: target '{ds.target_name}' has shape {ds.y.shape}; "
                        f"model.targets = \"every\" takes one per step, ({n}, {steps}) or "
                        f"({n}, {steps}, K) (one per sequence is model.targets = \"last\")")
    name = f"{ds.source}: target '{ds.target_name}'"
    if families.FAMILIES[mc.family].labels:
        y, classes = data.encode_step_labels(ds.y, ds.lengths, name=name)
        if len(classes) < 2:
            raise DataError(f"{name} has a single class {classes.tolist()}; {mc.family} needs at "
                            f"least 2")
        return y, classes
    there = data.alive(ds.lengths, n, steps)
    if mc.family == "bernoulli" and ds.y.ndim == 2 and _two_labels(ds.y[there]):
        y, classes = data.encode_step_labels(ds.y, ds.lengths, name=name)  # two labels: 0/1
        if len(classes) != 2:
            raise DataError(f"{name} has {len(classes)} labels {_few(classes)}; bernoulli takes "
                            f"two (or 0/1 per step); for more classes use model.family = "
                            f"\"multinomial\"")
        return y.astype(np.float64), classes
    if ds.y.dtype.kind not in "biuf":
        raise DataError(f"{name} holds {ds.y.dtype} values; a {mc.family} target per step must "
                        f"be numbers")
    return data.zero_padding(ds.y, ds.lengths), None


def _check_targets(net, y, ds):
    """net.check_targets, given the sequences' lengths where the model takes them; for sequences
    the encoded targets alone (the Targets' y: Trainer.fit takes the lengths on their own)."""
    if ds.X.ndim == 3:
        return net.check_targets(y, len(ds.X), steps=ds.X.shape[1], **_lengths_of(ds.lengths)).y
    return net.check_targets(y, len(ds.X))


def _lengths_of(lengths, rows=None) -> dict:
    """{"lengths": those of `rows`} for sequences of variable length, else {}."""
    if lengths is None:
        return {}
    return {"lengths": np.asarray(lengths if rows is None else lengths[rows])}


def _encoded_targets(ds, family, rank):
    """(y as the family takes it, class labels or None): multinomial labels as codes 0..K-1; two
    labels of a bernoulli target (strings, or numbers other than 0/1) as 0/1, the sorted second
    one as 1. The model file keeps the labels."""
    name = f"{ds.source}: target '{ds.target_name}'"
    labels = families.FAMILIES[family].labels
    if not labels and not (family == "bernoulli" and _two_labels(ds.y)):
        return ds.y, None
    y, classes = data.encode_labels(ds.y, name=name)
    if classes.dtype.kind not in "biufU":  # the model file keeps class labels as JSON
        raise DataError(f"{name} holds {classes.dtype} values; class labels must be numbers or "
                        f"strings")
    if labels and len(classes) < 2:
        raise DataError(f"{name} has a single class {classes.tolist()}; {family} needs at "
                        f"least 2")
    if not labels and len(classes) != 2:
        raise DataError(f"{name} has {len(classes)} labels {_few(classes)}; bernoulli takes two "
                        f"(or 0/1 columns); for more classes use model.family = \"multinomial\"")
    if labels and rank == 0 and len(classes) > max(2, len(y) / 5):
        warn(f"{name} has {len(classes)} classes in {len(y)} rows, fewer than 5 rows a class: "
             f"is it a continuous target? Then model.family = \"gaussian\" fits it")
    return (y if labels else y.astype(np.float64)), classes


def _two_labels(y) -> bool:
    """Whether a bernoulli target is one column of labels rather than probabilities: text, or
    numbers not all in [0, 1]."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        return False
    if y.dtype.kind not in "biuf":
        return True
    finite = y[np.isfinite(y)] if y.dtype.kind == "f" else y
    return bool(len(finite)) and not ((finite >= 0) & (finite <= 1)).all()


def _few(items, shown=4) -> str:
    items = list(items.tolist())
    return str(items[:shown])[:-1] + (", ...]" if len(items) > shown else "]")


def _network(sizes, mc, seed):
    """The configured network (a Recurrent for model.kind = "recurrent"); one too large for
    memory is model.hidden's error, not a crash."""
    recurrent = mc.kind == "recurrent"
    inner = [sizes[0] + mc.state, *sizes[1:-1], sizes[-1] + mc.state] if recurrent else sizes
    n = network.n_params(inner)
    nbytes = n * np.dtype(mc.dtype).itemsize
    if nbytes > sys.maxsize:  # numpy cannot shape it: a ValueError, not a MemoryError
        raise _too_big(inner, n, nbytes, mc.dtype)
    try:
        if recurrent:
            from .recurrent import Recurrent

            return Recurrent(sizes, mc.state, activation=mc.activation,
                             state_activation=mc.state_activation, family=mc.family,
                             targets=mc.targets, l1=mc.l1, l2=mc.l2, dtype=mc.dtype, seed=seed)
        return Network(sizes, activation=mc.activation, family=mc.family, l1=mc.l1, l2=mc.l2,
                       dtype=mc.dtype, seed=seed)
    except MemoryError:
        raise _too_big(inner, n, nbytes, mc.dtype) from None


def _too_big(sizes, n, nbytes, dtype) -> config.ConfigError:
    return config.ConfigError(f"model.hidden: a {'-'.join(map(str, sizes))} network needs "
                              f"{nbytes / 2**30:,.1f} GiB ({dtype}) for its {n:,} parameters "
                              f"alone; there is not that much memory")


def _test_set(source, target, train, steps=0) -> data.Dataset:
    """data.test_source, with the training data's features: CSV columns are picked by name, any
    other source must have as many columns (sequences: as many features per step)."""
    names = train.feature_names if source.lower().endswith(".csv") and not steps else None
    t = data.load(source, target=target or None, features=names, steps=steps)
    if t.X.ndim != train.X.ndim:
        raise DataError(f"{t.source}: X has shape {t.X.shape}, but the training data "
                        f"{train.source} has {train.X.ndim} dimensions {train.X.shape}")
    if t.n_features != train.n_features:
        raise DataError(f"{t.source}: {t.n_features} features, but the training data "
                        f"{train.source} has {train.n_features}")
    if t.X.ndim == 3:  # sequences: finite where their steps exist
        data.scan(t.X, name=f"{t.source}: X", lengths=t.lengths)
    else:
        data.check_finite(t.X, name=f"{t.source}: X")
    return t


class _Rows:
    """Rows `idx` of X without copying them: of a memory map the trainer reads only its batches."""

    def __init__(self, X, idx):
        self.X, self.idx = X, idx
        self.shape, self.ndim, self.dtype = (len(idx), *X.shape[1:]), X.ndim, X.dtype

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, rows):
        return self.X[self.idx[rows]]


def make_optimizer(oc):
    """The optimizer the [optim] section describes (each takes only its own hyper-parameters)."""
    hyper = {"sgd": ("lr", "momentum", "nesterov", "weight_decay"),
             "adam": ("lr", "betas", "eps", "weight_decay"),
             "adamw": ("lr", "betas", "eps", "weight_decay")}[oc.name]
    return optim.make_optimizer(oc.name, **{k: getattr(oc, k) for k in hyper})


def trainer_settings(cfg, checkpoint_dir, log) -> dict:
    """Trainer keyword arguments from the config (also the overrides of a resumed run)."""
    t, o = cfg.train, cfg.optim
    return {"batch_size": t.batch_size, "epochs": t.epochs, "seed": t.seed,
            "schedule": {"schedule": o.schedule, "step_size": o.step_size, "gamma": o.gamma,
                         "warmup_steps": o.warmup_steps, "min_lr": o.min_lr},
            "clip_norm": o.clip_norm, "patience": t.patience, "checkpoint_dir": str(checkpoint_dir),
            "checkpoint_every": t.checkpoint_every, "keep_checkpoints": t.keep_checkpoints,
            "deterministic": t.deterministic, "chunk_size": t.chunk_size,
            "check_every": t.check_every, "callback": log,
            "privacy": cfg.privacy.dp()} | _recurrent_settings(cfg)


def _recurrent_settings(cfg) -> dict:
    """The Trainer's settings a recurrent model adds: truncated BPTT."""
    return {"bptt": cfg.train.bptt} if cfg.model.kind == "recurrent" else {}
