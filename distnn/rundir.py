"""The run directory of `distnn train`: what a run may replace, resume from, and writes there.

It holds config.toml (resolved), data.json (the training data's fingerprint, which --resume
checks), metrics.jsonl (one line per epoch), checkpoints/, model.npz, curves.png and, as the very
last act of a successful run, done.json: the completion record. `train -n NP` fails a run that
ended without its own (done.json carries the launch's RUN_TOKEN). A fresh run replaces a finished
or checkpointed run, or files not of a distnn run (a run's config.toml starts with HEADER), only
with --overwrite. Rank 0 holds an flock on .lock for the whole run, so a second run into the
directory is refused, and, holding it, deletes the temp files a killed run left.

Rank 0 alone reads and writes the directory: RunDir.on_root runs that work, and raises what fails
there on every rank.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from . import checkpoint, config, data, progress, stopping
from .atomic import TEMP_NAME, write_atomically
from .checkpoint import CheckpointError
from .data import DataError
from .errors import USER_ERRORS, UsageError, warn
from .model import save_model

DONE = "done.json"  # the completion record
DATA = "data.json"  # the training data's fingerprint: a resumed run must see the same data
LOCK = ".lock"  # rank 0 holds an flock on it for the whole run: one run per directory at a time
CONFIG, METRICS, CURVES, MODEL = "config.toml", "metrics.jsonl", "curves.png", "model.npz"
CHECKPOINTS = "checkpoints"  # the folder of the training checkpoints
# The first line of the config.toml a run writes: a config.toml without it is the user's own
HEADER = "# distnn: the resolved config of this run, written by distnn train"
REPLACED = (CONFIG, DATA, METRICS, CURVES)  # what a fresh run rewrites
WRITTEN = (*REPLACED, DONE, MODEL)  # what a run writes into the directory (atomically)
RUN_TOKEN = "DISTNN_RUN_TOKEN"  # set by `train -n`; rank 0 copies it into done.json


class RunDir:
    """The run directory at `path`, for every rank of the run."""

    def __init__(self, path, comm):
        self.path, self.comm = Path(path), comm
        self.started = False  # `start` wrote the run's first files

    def on_root(self, fn, *args):
        """fn(*args) on rank 0 alone, its result there (None elsewhere); a user error there is
        raised on every rank."""
        return self.comm.together(fn, *args, root_only=True, catch=USER_ERRORS)

    @contextlib.contextmanager
    def locked(self):
        """Context: rank 0 holds the lock (every rank fails if another process holds it), then
        clears the temp files a killed run left; the lock goes when the context or the process
        ends. A directory made for this run goes too, if the run left before `start` wrote to it."""
        fd, made = self.on_root(_lock, self.path) or (None, False)
        try:
            self.on_root(_remove_stale_temp_files, self.path)
            yield
        finally:
            if fd is not None:
                if made and not self.started:  # a bad input or a stop before training
                    (self.path / LOCK).unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        self.path.rmdir()
                os.close(fd)  # an in-process caller may train into the directory again

    def checkpoint_to_resume(self) -> str | None:
        """The newest training checkpoint that loads, as rank 0 sees it, on every rank; None when
        there is none."""
        return self.comm.bcast_json(self.on_root(_newest_checkpoint, self.path / CHECKPOINTS))

    def may_start_afresh(self, args) -> None:
        """A fresh run would replace what is here: a finished run, checkpoints or files not of a
        distnn run only with --overwrite (without it, a run that then fails would have destroyed
        them for nothing)."""
        if not args.overwrite:
            self.on_root(_refuse_to_replace, self.path, args.resume)

    def may_resume(self, checkpoint_path, cfg, fingerprint) -> None:
        """A resumed run keeps its data split and order: the data, the seed, the batch size;
        without the files that tell (data.json, config.toml) it cannot resume."""
        self.on_root(_same_run, checkpoint_path, self.path, cfg, fingerprint)

    def say_resuming(self, checkpoint_path, trainer) -> None:
        """Rank 0 says where a resumed run continues (checkpoint_path None: it starts afresh,
        having none), or that it has nothing left to train, and warns of what looks wrong."""
        self.on_root(_say_resuming, self.path, checkpoint_path, trainer)

    def start(self, cfg, fingerprint, history, fresh) -> None:
        """Remove a stale completion record, write the config and the data's fingerprint, restart
        metrics.jsonl from the history the run continues (none when fresh, which removes what an
        earlier run left: may_start_afresh allowed it)."""
        self.started = True
        self.on_root(_start, self.path, cfg, fingerprint, history, fresh)

    def finish(self, model, record, started, scores) -> None:
        """model.npz, curves.png, then done.json, the completion record, last of all; `record` is
        done.json's, completed there with scores(model), the final validation and test scores."""
        self.on_root(_finish, self.path, model, record, started, scores)


def finished(run_dir, token) -> bool:
    """Whether done.json in run_dir records the launch that set RUN_TOKEN = token."""
    path = Path(run_dir) / DONE
    try:
        record = json.loads(path.read_text()) if path.is_file() else None  # a FIFO would block
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("run") == token


def check_out_dir(out, key) -> None:
    """The run directory, or else the nearest folder above it that exists, is a directory."""
    path = Path(out)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"{p} is a file"
                raise UsageError(f"{key} {out}: {what}, not a directory")
            break
    checkpoints = path / CHECKPOINTS
    if checkpoints.exists() and not checkpoints.is_dir():  # found up front, not after an epoch
        raise UsageError(f"{checkpoints}: is a file, not a directory; the run keeps its "
                         f"checkpoints there, so move it away")


def is_run_file(path) -> bool:
    """Whether `path` (its links resolved) is a file a run writes, in a run directory or its checkpoints."""
    where, name = path.parent, path.name
    in_run = (where / DONE).exists() or (where / DATA).exists()
    return (in_run and name in {*WRITTEN, LOCK}) or (
        where.name == CHECKPOINTS and (where.parent / DATA).exists())


def same_network(path, resumed, configured) -> None:
    """The checkpoint at `path` holds the network the config describes."""
    a, b = resumed.spec(), configured.spec()
    differ = "; ".join(f"{k} {a[k]} there, {b[k]} here" for k in a if a[k] != b[k])
    if differ:
        raise CheckpointError(f"{path}: the checkpoint's network differs from the config's "
                              f"({differ}); train into a new --out directory, or drop --resume")


# ------------------------------------------------------------------ rank 0: lock and temp files

def _lock(run):
    """An exclusive, non-blocking flock on run/.lock: (its descriptor, whether run was made
    here). The lock file stays: unlinking it would let a waiting run lock a file nobody else
    sees (only a directory this run made and left unused goes, lock and all)."""
    made = not run.exists()
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
    return fd, made


def _remove_stale_temp_files(run) -> None:
    """Holding the lock: delete the temp files (atomic.TEMP_NAME) of run files and checkpoints a
    killed run left, and only those; no other process writes them now."""
    for directory, names in ((run, WRITTEN), (run / CHECKPOINTS, None)):
        if not directory.is_dir():
            continue
        for p in directory.iterdir():
            m = TEMP_NAME.fullmatch(p.name)
            ours = m and (m["name"] in names if names else checkpoint.is_checkpoint_name(m["name"]))
            if ours and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)


# ------------------------------------------------------------- rank 0: what a run may replace

def _newest_checkpoint(directory) -> str | None:
    """The newest training checkpoint that loads, warning of each newer one passed over."""
    def warn(error):
        print(f"distnn: warning: cannot resume from {error}; trying an older checkpoint",
              file=sys.stderr, flush=True)
    try:
        found = checkpoint.latest_checkpoint(directory, kind="training", passed_over=warn)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Restore one, or train afresh with --overwrite") from None
    return None if found is None else str(found)


def _refuse_to_replace(run, resume) -> None:
    """Refuse a fresh run (reached with `resume` when there is no checkpoint) where it would
    replace a finished run, checkpoints or files not of a distnn run."""
    if (run / DONE).exists() or (run / MODEL).exists():
        held = "a finished run"
    elif checkpoint.list_checkpoints(run / CHECKPOINTS):
        held = "checkpoints of an unfinished run"
    else:
        _no_foreign_files(run)
        return
    if resume:
        raise UsageError(f"{run}: holds {held} but no checkpoint to resume from; train afresh "
                         f"with --overwrite instead of --resume, or into another --out directory")
    raise UsageError(f"{run}: holds {held}; continue it with --resume, train into another --out "
                     f"directory, or pass --overwrite to replace it")


def _no_foreign_files(run) -> None:
    """A fresh run replaces REPLACED; refuse when one is the user's, not a distnn run's: a run
    writes config.toml (with HEADER) first, so the others count as a run's only beside it. Empty
    files lose nothing (and are what a run that failed at once may leave)."""
    ours = _written_by_a_run(run / CONFIG)
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


# --------------------------------------------------------------- rank 0: what resuming checks

def _same_run(path, run, cfg, fingerprint) -> None:
    """The data and the settings of its split and order are the ones the run started with."""
    _same_data(run / DATA, cfg.data.source, fingerprint)
    saved = run / CONFIG
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


# ------------------------------------------------------------ rank 0: starting and finishing

def _say_resuming(run, checkpoint_path, trainer) -> None:
    """See RunDir.say_resuming."""
    if checkpoint_path is None:
        print(f"distnn: no checkpoint to resume from in {run / CHECKPOINTS}; training "
              f"from the start", flush=True)
        return
    if trainer.epoch < trainer.epochs and not trainer.early.stopped:
        where = f"continuing at epoch {trainer.epoch + 1}, step {trainer.step + 1}"
    elif (run / DONE).exists():
        where = "the run had finished (done.json); nothing is left to train"
    else:
        where = (f"the run had trained its {trainer.epoch} epochs but not finished; writing "
                 f"its model and completion record")
    print(f"distnn: resuming from {checkpoint_path}: {where}", flush=True)
    grown = stopping.exploded(trainer.history)
    if grown:
        warn(f"{checkpoint_path}: the training loss had already {grown} when it was written; "
             f"continuing a run gone wrong: train afresh (--overwrite), with a lower optim.lr")
    schedule = trainer.schedule.get("schedule", "constant")
    before = config.load_config(run / CONFIG).train.epochs  # may_resume read it
    if schedule in ("cosine", "linear") and before != trainer.epochs:
        warn(f"the {schedule} learning-rate schedule ran over {before} epochs and now runs "
             f"over {trainer.epochs}: the remaining steps follow it stretched (after a "
             f"finished run the rate rises again)")



def _start(run, cfg, fingerprint, history, fresh) -> None:
    (run / DONE).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    if fresh:
        for old in [run / MODEL, run / CURVES,
                    *checkpoint.list_checkpoints(run / CHECKPOINTS)]:
            old.unlink(missing_ok=True)
    write_atomically(run / CONFIG, lambda f: f.write(f"{HEADER}\n{config.to_toml(cfg)}"))
    _write_json(run / DATA, fingerprint)
    write_atomically(run / METRICS,
                     lambda f: f.writelines(json.dumps(r) + "\n" for r in history))


def _finish(run, model, done, started, scores) -> None:
    done |= scores(model)
    save_model(model, run / MODEL, meta={"metrics": done})
    try:
        if done["last"] is not None:  # epochs = 0 trains nothing and has nothing to plot
            progress.plot_curves(progress.read_metrics(run / METRICS), run / CURVES,
                                 penalty=progress.penalty(model.net.l1, model.net.l2))
    except ImportError:
        print("distnn: note: no matplotlib, so no curves.png (pip install 'distnn[examples]')",
              file=sys.stderr)
    shown = "  ".join(f"{k} {v:.4g}" for k, v in done.get("val", {}).items())
    print(f"done: {run}/{MODEL}" + (f"  (validation: {shown})" if shown else ""), flush=True)
    done["seconds"] = time.perf_counter() - started
    if os.environ.get(RUN_TOKEN):
        done["run"] = os.environ[RUN_TOKEN]  # tells `train -n` that this launch finished
    _write_json(run / DONE, done)


def _write_json(path, obj) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1) + "\n"))
