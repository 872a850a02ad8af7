"""One training run, the same code on every rank: `distnn train` (cli.py) calls train(args, comm).

Every rank loads the config and the data, checks and splits it, fits the standardization (moments
summed exactly across ranks), builds the network or resumes the newest checkpoint that loads, then
fits. A user error (USER_ERRORS) on any rank is raised on every rank, so the command line reports it
once; divergence and signals are the trainer's (DivergenceError, Interrupted).

A run directory (rank 0 writes it) holds config.toml (resolved), data.json (the training data's
fingerprint, which --resume checks), metrics.jsonl (one line per epoch), checkpoints/, model.npz,
curves.png and, as the very last act of a successful run, done.json: the completion record.
`train -n NP` fails a run that ended without its own (done.json carries the launch's RUN_TOKEN).
A fresh run replaces a finished or checkpointed run, or files not of a distnn run (a run's
config.toml starts with HEADER), only with --overwrite. Rank 0 holds an flock on .lock for the whole
run, so a second run into the directory is refused, and, holding it, deletes the temp files a killed
run left.

Progress: one summary line per epoch on stdout, and a tqdm bar below them when stdout is a terminal
(DISTNN_PROGRESS=1 forces it on, =0 off; `train -n` sets it for its ranks, whose stdout is
mpiexec's pipe). Bar and lines share stdout: through mpiexec two streams would interleave.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint, config, data, exactsum, optim
from .checkpoint import CheckpointError
from .data import DataError, Standardizer
from .model import Model, save_model
from .network import Network

DONE = "done.json"  # the completion record
DATA = "data.json"  # the training data's fingerprint: a resumed run must see the same data
LOCK = ".lock"  # rank 0 holds an flock on it for the whole run: one run per directory at a time
# The first line of the config.toml a run writes: a config.toml without it is the user's own
HEADER = "# distnn: the resolved config of this run, written by distnn train"
REPLACED = ("config.toml", DATA, "metrics.jsonl", "curves.png")  # what a fresh run rewrites
# Temp files of write_atomically (.NAME.PID.tmp) and checkpoint.save (.NAME.PID.HEX8.tmp)
_TEMP = re.compile(r"\.(?P<name>.+?)\.\d+(\.[0-9a-f]{8})?\.tmp")
RUN_TOKEN = "DISTNN_RUN_TOKEN"  # set by `train -n`; rank 0 copies it into done.json
SCALER_CHUNK = 4096  # rows per standardization chunk: moments are summed exactly over chunks


# ------------------------------------------------------------------- user errors and the config

class UsageError(ValueError):
    """A bad command-line flag or combination; the message names the flag (cli.py raises it too)."""


# Bad input, said in one line with exit code 2. OSError: unwritable run directory, disk full.
USER_ERRORS = (ValueError, OSError)


def _together(comm, fn, *args):
    """fn(*args) on every rank; a user error on any rank is raised on every rank."""
    result, error = None, None
    try:
        result = fn(*args)
    except USER_ERRORS as e:
        error = e
    comm.fail_together(error)
    return result


def load_train_config(args) -> config.Config:
    """The config file with --set overrides applied and --out as its out_dir."""
    cfg = config.load_config(args.config, overrides=args.set)
    if args.out is not None:
        if not args.out.strip():
            raise UsageError("--out: expected a directory, got an empty string")
        cfg.out_dir = args.out
    _check_out_dir(cfg.out_dir, "--out" if args.out is not None else "out_dir")
    return cfg


def _check_out_dir(out, key) -> None:
    """The run directory, or else the nearest folder above it that exists, is a directory."""
    path = Path(out)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"{p} is a file"
                raise UsageError(f"{key} {out}: {what}, not a directory")
            break
    checkpoints = path / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():  # found up front, not after an epoch
        raise UsageError(f"{checkpoints}: is a file, not a directory; the run keeps its "
                         f"checkpoints there, so move it away")


def finished(run_dir, token) -> bool:
    """Whether done.json in run_dir records the launch that set RUN_TOKEN = token."""
    path = Path(run_dir) / DONE
    try:
        record = json.loads(path.read_text()) if path.is_file() else None  # a FIFO would block
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("run") == token


# ------------------------------------------------------------------------------------- train

def train(args, comm) -> int:
    """Every rank: config, data, standardization, network, then fit; rank 0 writes the run dir."""
    from . import threads
    from .comm import Comm
    from .trainer import Trainer

    started = time.perf_counter()
    cfg = _together(comm, load_train_config, args)
    given = args.threads if args.threads is not None else cfg.train.threads
    if cfg.train.deterministic:  # the same threads at any P (GEMM rounding depends on the count):
        pinned = {"threads": given} if given else {}  # 1, or what a resumed checkpoint ran with
        n = threads.limit_blas_threads(given or 1)
    else:
        n = threads.limit_blas_threads(given or comm.blas_share())
        pinned = {"threads": n}
    job = _together(comm, prepare, cfg, comm.rank, comm.size)
    comm.allreduce(job.crcs, what="data checksum")  # every block's crc32, on every rank
    fingerprint = data.fingerprint(job.dataset, job.classes, job.crcs)
    scaler = fit_scaler(job.X, job.train, comm) if cfg.data.standardize else None
    run = Path(cfg.out_dir)
    with hold_lock(comm, run):  # before anything in the run directory is read or touched
        tcomm = Comm(timeout=cfg.train.watchdog or None,
                     bucket_bytes=int(cfg.train.bucket_mb * 2**20))
        log = _EpochLog(run, cfg.train.epochs, comm.is_root)
        settings = trainer_settings(cfg, run / "checkpoints", log) | pinned
        resume_from = _latest(comm, run / "checkpoints") if args.resume else None
        if resume_from is None:
            _together(comm, _may_start_afresh, run, args, comm.is_root)
            trainer = Trainer(job.net, make_optimizer(cfg.optim), comm=tcomm, **settings)
        else:
            trainer = Trainer.resume(resume_from, comm=tcomm, optimizer=make_optimizer(cfg.optim),
                                     **settings)
            _same_network(resume_from, trainer.net, job.net)
            _together(comm, _same_run, resume_from, run, cfg, fingerprint, comm.is_root)
        _together(comm, _start_run_dir, run, cfg, fingerprint, trainer.history, resume_from is None,
                  comm.is_root)
        # NaN/Inf is the trainer's to report (one message naming the step), not numpy's warnings
        with log.progress(trainer.epoch), np.errstate(all="ignore"):
            trainer.fit(_Rows(job.X, job.train), job.y[job.train], *job.val_split(),
                        transform=None if scaler is None else scaler.transform,
                        scan=False)  # prepare() scanned every row of X already
        model = Model(trainer.net, scaler, job.classes, job.meta(cfg))
        done = {"epochs": trainer.epoch, "steps": trainer.step, "ranks": comm.size,
                "threads": trainer.threads or 1 if cfg.train.deterministic else n,
                "last": trainer.history[-1] if trainer.history else None}
        _together(comm, _finish_run_dir, run, model, job, done, started, comm.is_root)
        return 0


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
    test: tuple | None       # (X, labels) of data.test_source
    net: Network
    crcs: np.ndarray         # (blocks,) int64: crc32 of the blocks of X this rank read, else 0

    def val_split(self):
        """(X_val, y_val) for Trainer.fit, or (None, None) without validation rows."""
        if len(self.val) == 0:
            return None, None
        return _Rows(self.X, self.val), self.y[self.val]

    def meta(self, cfg) -> dict:
        """Facts the model file keeps besides the network."""
        ds = self.dataset
        return {"source": ds.source, "target": cfg.data.target or ds.target_name,
                "features": ds.feature_names, "config": config.to_dict(cfg)}


def prepare(cfg, rank, size) -> Job:
    """Load, check and split the data and build the network; the same on every rank."""
    dc, mc = cfg.data, cfg.model
    ds = data.load(dc.source, target=dc.target or None, features=dc.features or None)
    # each rank checks its blocks (all fail together) and checksums them in the same read
    crcs = data.scan(ds.X, rank, size, name=f"{ds.source}: X")
    classes = None
    if mc.family == "multinomial":
        y, classes = data.encode_labels(ds.y, name=f"{ds.source}: target '{ds.target_name}'")
        if classes.dtype.kind not in "biufU":  # the model file keeps class labels as JSON
            raise DataError(f"{ds.source}: target '{ds.target_name}' holds {classes.dtype} values; "
                            f"class labels must be numbers or strings")
        if len(classes) < 2:
            raise DataError(f"{ds.source}: target '{ds.target_name}' has a single class "
                            f"{classes.tolist()}; multinomial needs at least 2")
        n_out = len(classes)
    else:
        y, n_out = ds.y, 1 if ds.y.ndim == 1 else ds.y.shape[1]
    net = _network([ds.X.shape[1], *mc.hidden, n_out], mc, cfg.train.seed)
    try:
        y = net.check_targets(y, len(ds.X))  # targets that do not fit the family fail here
    except ValueError as e:
        raise DataError(f"{ds.source}: target '{ds.target_name}': {e}") from None
    train_rows, val_rows = data.train_val_split(len(ds.X), dc.val_fraction, cfg.train.seed)
    if len(train_rows) < max(size, cfg.train.batch_size):
        raise DataError(f"{ds.source}: {len(train_rows)} training rows, fewer than train.batch_size "
                        f"{cfg.train.batch_size} or the {size} ranks")
    test = None
    if dc.test_source:
        t = _test_set(dc.test_source, dc.target, ds)
        try:
            Model(net, None, classes).targets(t.y)  # labels the model cannot know fail now
        except ValueError as e:
            raise DataError(f"{t.source}: target '{t.target_name}': {e}") from None
        test = (t.X, t.y)
    make_optimizer(cfg.optim)  # bad hyper-parameters fail before anything starts
    return Job(ds.X, y, ds.y, train_rows, val_rows, classes, ds, test, net, crcs)


def _network(sizes, mc, seed) -> Network:
    """The configured network; one too large for memory is model.hidden's error, not a crash."""
    try:
        return Network(sizes, activation=mc.activation, family=mc.family, l1=mc.l1, l2=mc.l2,
                       dtype=mc.dtype, seed=seed)
    except MemoryError:
        n = sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:]))
        gib = n * np.dtype(mc.dtype).itemsize / 2**30
        raise config.ConfigError(f"model.hidden: a {'-'.join(map(str, sizes))} network needs "
                                 f"{gib:,.1f} GiB for its {n:,} parameters alone; there is not "
                                 f"that much memory") from None


def _test_set(source, target, train) -> data.Dataset:
    """data.test_source, with the training data's features: CSV columns are picked by name, any
    other source must have as many columns."""
    names = train.feature_names if source.lower().endswith(".csv") else None
    t = data.load(source, target=target or None, features=names)
    if t.X.shape[1] != train.X.shape[1]:
        raise DataError(f"{t.source}: {t.X.shape[1]} features, but the training data "
                        f"{train.source} has {train.X.shape[1]}")
    data.check_finite(t.X, name=f"{t.source}: X")
    return t


def fit_scaler(X, rows, comm) -> Standardizer:
    """Standardization of X[rows]; each rank reads its chunks of rows and the moments are summed
    exactly, so every rank count yields the same bits (what deterministic mode promises)."""
    d = X.shape[1]
    shift = np.asarray(X[0], np.float64)
    n_chunks = max(1, -(-len(rows) // SCALER_CHUNK))
    first, last = data.chunk_range(n_chunks, comm.size, comm.rank)
    moments = np.zeros((last - first, 2 * d + 1))  # one chunk's [count, sum, sumsq] per row
    for i, j in enumerate(range(first, last)):
        chunk = rows[j * SCALER_CHUNK:(j + 1) * SCALER_CHUNK]
        moments[i] = Standardizer.moments(X, chunk, shift=shift)
    try:
        m = comm.exact_sum(moments, n_chunks, what="standardization")
    except exactsum.NonFiniteError:  # the same verdict on every rank: the check follows the MAX
        raise DataError("X has values too large to standardize (their squares overflow, |x| > "
                        "1e154); rescale the data or set data.standardize = false") from None
    return Standardizer.from_moments(m[0], m[1:d + 1], m[d + 1:], shift)


class _Rows:
    """Rows `idx` of X without copying them: of a memory map the trainer reads only its batches."""

    def __init__(self, X, idx):
        self.X, self.idx = X, idx
        self.shape, self.ndim, self.dtype = (len(idx), X.shape[1]), 2, X.dtype

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
            "check_every": t.check_every, "callback": log}


def _latest(comm, directory):
    """The newest checkpoint in `directory` that loads, as rank 0 sees it, on every rank; None
    when there is none. Checkpoints none of which loads are an error (resuming them is impossible,
    training afresh would silently drop them)."""
    return comm.bcast_json(_together(comm, _newest_loadable, directory, comm.is_root))


def _newest_loadable(directory, is_root):
    """Rank 0: the newest training checkpoint that loads, naming each newer one it passed over."""
    if not is_root:
        return None
    candidates, refused = checkpoint.list_checkpoints(directory), []
    for candidate in reversed(candidates):
        try:
            checkpoint.load(candidate, kind="training")
        except CheckpointError as e:
            refused.append(e)
            continue
        for e in refused:
            print(f"distnn: warning: cannot resume from {e}; trying an older checkpoint",
                  file=sys.stderr, flush=True)
        return str(candidate)
    if candidates:
        raise CheckpointError(f"{directory}: none of the {len(candidates)} checkpoints loads "
                              f"(the newest: {refused[0]}); nothing to resume. Restore one, or "
                              f"train afresh with --overwrite")
    return None


def _may_start_afresh(run, args, is_root) -> None:
    """Rank 0: a fresh run would replace what is in `run`; a finished run, checkpoints or files
    not of a distnn run only with --overwrite (without it, a run that then fails would have
    destroyed them for nothing)."""
    if not is_root or args.overwrite:
        return
    if (run / DONE).exists() or (run / "model.npz").exists():
        held = "a finished run"
    elif checkpoint.list_checkpoints(run / "checkpoints"):
        held = "checkpoints of an unfinished run"
    else:
        _no_foreign_files(run)
        return
    if args.resume:  # reached with no checkpoint to resume from
        raise UsageError(f"{run}: holds {held} but no checkpoint to resume from; train afresh "
                         f"with --overwrite instead of --resume, or into another --out directory")
    raise UsageError(f"{run}: holds {held}; continue it with --resume, train into another --out "
                     f"directory, or pass --overwrite to replace it")


def _no_foreign_files(run) -> None:
    """A fresh run replaces REPLACED; refuse when one is the user's, not a distnn run's: a run
    writes config.toml (with HEADER) first, so the others count as a run's only beside it. Empty
    files lose nothing (and are what a run that failed at once may leave)."""
    ours = _written_by_a_run(run / "config.toml")
    for name in REPLACED:
        p = run / name
        if (p.exists() or p.is_symlink()) and not ours and not _empty_file(p):
            raise UsageError(f"{p}: a fresh run would replace it, and it is not a distnn run's "
                             f"(whose config.toml begins '# distnn:'); train into another --out "
                             f"directory, or pass --overwrite to replace it")


def _written_by_a_run(path) -> bool:
    """Whether `path` is a plain file whose first line is HEADER."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().rstrip("\n") == HEADER


def _empty_file(path) -> bool:
    return not path.is_symlink() and path.is_file() and path.stat().st_size == 0


def _same_run(path, run, cfg, fingerprint, is_root) -> None:
    """A resumed run must keep its data split and order: the data, the seed, the batch size;
    without the files that tell (data.json, config.toml) it cannot resume."""
    if not is_root:
        return
    _same_data(run / DATA, cfg.data.source, fingerprint)
    saved = run / "config.toml"
    _required(saved, "the data split and order settings are the ones")
    before = config.to_dict(config.load_config(saved))
    now = config.to_dict(cfg)
    keys = [("data", k) for k in ("source", "target", "features", "val_fraction", "standardize")]
    keys += [("train", "seed"), ("train", "batch_size")]
    differ = [f"{a}.{b} {before[a].get(b)!r} there, {now[a][b]!r} here" for a, b in keys
              if before[a].get(b) != now[a][b]]
    if differ:
        raise CheckpointError(f"{path}: the run was trained with other data settings "
                              f"({'; '.join(differ)}); resuming would change its data split or "
                              f"order. Train into a new --out directory, or drop --resume")


def _required(path, what) -> None:
    """`path`, which resuming checks against, is a plain file (a FIFO would block the read)."""
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path} is missing: cannot check {what} the run started with; "
                              f"restore it or train afresh with --overwrite")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file; restore the one the run wrote or "
                              f"train afresh with --overwrite")


def _same_data(path, source, now) -> None:
    """The data's fingerprint (data.fingerprint) is the one the run started with."""
    _required(path, "the data is the one")
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable data fingerprint ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable data fingerprint (nested too deeply)") from None
    if not isinstance(before, dict):
        raise CheckpointError(f"{path}: not a data fingerprint (a JSON object)")
    differ = data.fingerprint_changes(before, now)
    if differ:
        raise DataError(f"{source}: the training data changed since the run started "
                        f"({'; '.join(differ)}); resuming would train on other data. Train into "
                        f"a new --out directory, or drop --resume")


def _same_network(path, resumed, configured) -> None:
    a, b = resumed.spec(), configured.spec()
    differ = "; ".join(f"{k} {a[k]} there, {b[k]} here" for k in a if a[k] != b[k])
    if differ:
        raise CheckpointError(f"{path}: the checkpoint's network differs from the config's "
                              f"({differ}); train into a new --out directory, or drop --resume")


# ------------------------------------------------------------------------ the run directory

@contextlib.contextmanager
def hold_lock(comm, run):
    """Context: rank 0 holds `run`'s lock (every rank fails if another process holds it), then
    clears the temp files a killed run left; the lock goes when the context or the process ends."""
    fd = _together(comm, _lock, run, comm.is_root)
    try:
        _together(comm, _remove_stale_temp_files, run, comm.is_root)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # an in-process caller may train into `run` again


def _lock(run, is_root):
    """Rank 0: an exclusive, non-blocking flock on run/.lock; its descriptor, or None elsewhere.
    The lock file stays: unlinking it would let a waiting run lock a file nobody else sees."""
    if not is_root:
        return None
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OSError(f"{path}: cannot open the run directory's lock ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise UsageError(f"another run is training into {run} (it holds {path} locked); "
                             f"wait for it to end, or train into another --out directory") from None
        raise OSError(f"{path}: cannot lock the run directory ({e.strerror or e})") from None
    return fd


def _remove_stale_temp_files(run, is_root) -> None:
    """Rank 0, holding the lock: delete the temp files of run files a killed run left, and only
    those (`.NAME.PID.tmp`, `.ckpt-*.npz.PID.HEX.tmp`); no other process writes them now."""
    if not is_root:
        return
    for directory, names in ((run, {*REPLACED, DONE, "model.npz"}), (run / "checkpoints", None)):
        if not directory.is_dir():
            continue
        for p in directory.iterdir():
            m = _TEMP.fullmatch(p.name)
            ours = m and (m["name"] in names if names else checkpoint.is_checkpoint_name(m["name"]))
            if ours and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)


def _start_run_dir(run, cfg, fingerprint, history, fresh, is_root) -> None:
    """Rank 0: remove a stale completion record, write the config and the data's fingerprint,
    restart metrics.jsonl from the history the run continues (none when fresh, which removes what
    an earlier run left: _may_start_afresh allowed it)."""
    if not is_root:
        return
    (run / DONE).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    if fresh:
        for old in [run / "model.npz", run / "curves.png",
                    *checkpoint.list_checkpoints(run / "checkpoints")]:
            old.unlink(missing_ok=True)
    write_atomically(run / "config.toml", lambda f: f.write(f"{HEADER}\n{config.to_toml(cfg)}"))
    _write_json(run / DATA, fingerprint)
    write_atomically(run / "metrics.jsonl",
                     lambda f: f.writelines(json.dumps(r) + "\n" for r in history))


def _finish_run_dir(run, model, job, done, started, is_root) -> None:
    """Rank 0: model.npz, curves.png, then done.json, the completion record, last of all."""
    if not is_root:
        return
    if len(job.val):
        done["val"] = model.scores(_Rows(job.X, job.val), job.labels[job.val])
    if job.test is not None:
        done["test"] = model.scores(*job.test)
    save_model(run / "model.npz", model.net, scaler=model.scaler, classes=model.classes,
               meta=model.meta | {"metrics": done})
    try:
        if done["last"] is not None:  # epochs = 0 trains nothing and has nothing to plot
            plot_curves(read_metrics(run / "metrics.jsonl"), run / "curves.png")
    except ImportError:
        print("distnn: note: no matplotlib, so no curves.png (pip install 'distnn[examples]')",
              file=sys.stderr)
    scores = "  ".join(f"{k} {v:.4g}" for k, v in done.get("val", {}).items())
    print(f"done: {run}/model.npz" + (f"  (validation: {scores})" if scores else ""), flush=True)
    done["seconds"] = time.perf_counter() - started
    if os.environ.get(RUN_TOKEN):
        done["run"] = os.environ[RUN_TOKEN]  # tells `train -n` that this launch finished
    _write_json(run / DONE, done)


def _write_json(path, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one."""
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1) + "\n"))


def write_atomically(path, write, binary=False, through=False) -> None:
    """write(f) to a temp file beside `path`, then rename it over `path`: a full disk or a crash
    leaves the old file whole, never half a new one. With `through` (a user's output file)
    anything but a plain file (a link, a FIFO, /dev/stdout) is written in place instead, where
    renaming over it would replace it; run files always replace the path, never write through a
    link to a file elsewhere. An OSError names `path`."""
    path = Path(path)
    if through and (path.is_symlink() or (path.exists() and not path.is_file())):
        try:
            with open(path, "wb") if binary else open(path, "w", newline="") as f:
                write(f)
        except OSError as e:
            raise OSError(f"{path}: cannot write ({e.strerror or e})") from None
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


class _EpochLog:
    """The trainer's per-epoch callback: rank 0 appends to metrics.jsonl, prints, moves the bar."""

    def __init__(self, run, epochs, is_root):
        self.path, self.epochs, self.is_root, self.bar = run / "metrics.jsonl", epochs, is_root, None

    def __call__(self, record):
        if not self.is_root:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")  # closed, so flushed: a crash loses no epoch
        except OSError as e:
            raise OSError(f"{self.path}: cannot write ({e.strerror or e})") from None
        line = epoch_line(record, self.epochs)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line)  # above the bar, on the bar's stream: the two never interleave
        else:
            print(line, flush=True)

    def progress(self, done):
        """Context: a tqdm bar over the epochs on rank 0 while training."""
        from tqdm import tqdm

        env = os.environ.get("DISTNN_PROGRESS")
        show = self.is_root and (env == "1" or (env != "0" and is_terminal(sys.stdout)))
        self.bar = tqdm(total=self.epochs, initial=done, unit="epoch", disable=not show,
                        leave=False, dynamic_ncols=True, file=sys.stdout)
        return self.bar


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal; a closed stdout (`>&-`) is None in Python, and not one."""
    return stream is not None and stream.isatty()


def epoch_line(r, epochs) -> str:
    """One concise line per epoch: epoch, losses, accuracies, seconds."""
    names = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc"}
    parts = [f"epoch {r['epoch']}/{epochs}"]
    parts += [f"{short} {r[key]:.4g}" for key, short in names.items() if key in r]
    return "  ".join(parts + [f"{r['seconds']:.2f}s"])


# ------------------------------------------------------------------------------ curves.png

def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a missing file or a bad line is a DataError naming it."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read metrics ({e.strerror})") from None
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise DataError(f"{path} line {i}: not a JSON record") from None
        if not _epoch_record(record):
            raise DataError(f"{path} line {i}: not an epoch record (a JSON object with an integer "
                            f"\"epoch\" and numbers for the losses and accuracies)")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no epochs recorded yet")
    return records


PLOTTED = ("loss", "val_loss", "accuracy", "val_accuracy")


def _epoch_record(r) -> bool:
    """A dict with an integer epoch and a number (or null) for each plotted key it has."""
    def number(v):
        return v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
    return (isinstance(r, dict) and isinstance(r.get("epoch"), int)
            and not isinstance(r["epoch"], bool) and all(number(r[k]) for k in PLOTTED if k in r))


def plot_curves(records, path, through=False) -> None:
    """Loss and validation loss (and accuracies, for classifiers) against the epoch, as a PNG;
    `through` as in write_atomically."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    panels = [("loss", "val_loss")] + [("accuracy", "val_accuracy")] * ("accuracy" in records[0])
    fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    epochs = [r["epoch"] for r in records]
    for ax, keys in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        for key in keys:
            if key in records[0]:
                ax.plot(epochs, [r.get(key, np.nan) for r in records], marker=".", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(keys[0])
        ax.grid(alpha=0.3)
        ax.legend()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True,
                     through=through)
