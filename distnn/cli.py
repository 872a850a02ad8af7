"""The `distnn` command line: train, evaluate, predict, info, plot, bench.

    distnn train examples/digits.toml -n 2           # starts `mpiexec -n 2` itself
    mpiexec -n 2 distnn train examples/digits.toml   # the same run (or `python -m distnn`)
    distnn evaluate runs/digits/model.npz sklearn:digits
    distnn predict runs/digits/model.npz data.csv -o predictions.csv
    distnn info runs/digits/model.npz
    distnn plot runs/digits

`train` runs run.train on every rank (run.py: the run; rundir.py: what it writes in its run
directory); `train -n NP` starts this same command under `mpiexec -n NP` (launcher.py), passing
SIGINT/SIGTERM on to it once, and fails a run that ended without a completion record, done.json,
written by this launch.

Exit codes: 0 success; 1 training diverged, or the run ended without its completion record;
2 bad input (config, data, checkpoint, flags): one line "distnn: error: ..." on stderr from rank 0;
128+N stopped by signal N (SIGTERM 143, SIGINT 130): in the set-up with nothing written, in
training after a checkpoint (a signal after the last step lets the run finish: 0). Anything
unexpected prints its traceback and aborts the whole MPI job.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import secrets
import signal
import sys
from pathlib import Path

from . import config, data, launcher, progress, run, rundir
from .atomic import write_atomically
from .errors import USER_ERRORS, ArgumentParser, UsageError
from .model import load_model
from .stopping import StopRequest

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")  # set inside an MPI job
MAX_RANKS = 65536    # -n beyond this is a typo (and past 2**32 wraps around in mpiexec)


# ------------------------------------------------------------------------------------- train

def train(args) -> int:
    """`distnn train`: under mpiexec -n NP when -n > 1, else in this process on MPI.COMM_WORLD."""
    if args.np > 1:
        return launch(args)
    # From here to exit SIGTERM/SIGINT only ask for a stop, which the ranks agree on: an
    # exception raised in a collective would leave the peers waiting there for ever
    stop = StopRequest()
    process = stop.held()  # `distnn train`'s first line held them: the process is this run's
    stop.install()
    from .comm import Comm, install_excepthook  # imports mpi4py: MPI starts after the handlers
    from .trainer import DivergenceError, Interrupted

    # one Comm: every collective runs under the watchdog, from the config's agreement to the
    # completion record (run.train sets the config's deadline once it is known)
    stop.comm = comm = Comm(timeout=config.TrainConfig.watchdog)
    install_excepthook(comm)
    try:
        return run.train(args, comm, stop)
    except Interrupted as e:
        return _say(comm, f"distnn: {e}", 128 + e.signum)
    except DivergenceError as e:
        return _say(comm, f"distnn: {e}", 1)
    except USER_ERRORS as e:
        return _say(comm, error_line(e), 2)
    finally:
        if not process:  # called in-process (a test, a script): its handlers go back
            stop.uninstall()


def launch(args) -> int:
    """`train -n NP`: this same command under `mpiexec -n NP`, then insist on the completion record."""
    if any(k in os.environ for k in _MPI_ENV):
        raise UsageError("-n starts mpiexec itself; inside an MPI job run `distnn train` without -n")
    cfg = run.load_train_config(args)  # a bad config fails here, before any process starts
    from .threads import blas_env, usable_cpus

    n = args.threads if args.threads is not None else cfg.train.threads
    token = secrets.token_hex(16)  # rank 0 writes it into done.json: this launch finished
    env = os.environ | blas_env(n or max(1, usable_cpus() // args.np)) | {rundir.RUN_TOKEN: token}
    if progress.is_terminal(sys.stdout):
        env.setdefault("DISTNN_PROGRESS", "1")
    argv = ["train", args.config, *(f"--set={s}" for s in args.set)]  # all but -n
    if args.out is not None:
        argv.append(f"--out={args.out}")
    argv += [flag for flag, on in (("--resume", args.resume), ("--overwrite", args.overwrite)) if on]
    if args.threads is not None:
        argv.append(f"--threads={args.threads}")
    mpiexec = launcher.find_mpiexec()
    if mpiexec is None:
        raise UsageError(f"-n needs mpiexec: {launcher.NOT_FOUND}")
    code = launcher.run_forwarding_signals(
        [*mpiexec, "-n", str(args.np), sys.executable, "-m", "distnn", *argv], env)
    if code != 0:
        return code
    if not rundir.finished(cfg.out_dir, token):  # a stale done.json does not vouch for this run
        print("distnn: error: the run ended without its completion record (a rank exited early?)",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- plots

def plot(args) -> int:
    """`distnn plot RUN_DIR [-o PNG]`."""
    run_dir = Path(args.run_dir)
    out = Path(args.output) if args.output else run_dir / rundir.CURVES
    try:
        # -o names the user's file (written through a link); RUN_DIR/curves.png is replaced
        progress.plot_curves(progress.read_metrics(run_dir / rundir.METRICS), out,
                             through=args.output is not None)
    except ImportError:
        raise UsageError("distnn plot needs matplotlib: pip install 'distnn[examples]'") from None
    print(out)
    return 0


# --------------------------------------------------------------- evaluate, predict, info

def _model_data(args, require_target=True):
    """(model, dataset) for evaluate/predict; CSV columns are picked by the model's feature names.
    A data set of other width is refused first: its labels cannot be judged before that."""
    model = load_model(args.model)
    target = args.target or model.meta.get("target") or None
    features = model.meta.get("features") if args.data.lower().endswith(".csv") else None
    ds = data.load(args.data, target=target, features=features, require_target=require_target)
    if ds.X.shape[1] != model.net.sizes[0]:
        names = f" ({_shorten(model.meta['features'])})" if model.meta.get("features") else ""
        raise data.DataError(f"{ds.source}: {ds.X.shape[1]} features, but the model {args.model} "
                             f"takes {model.net.sizes[0]}{names}")
    return model, ds


def evaluate(args) -> int:
    """`distnn evaluate MODEL DATA`: the model's metrics, one `name value` per line (or JSON)."""
    model, ds = _model_data(args)
    scores = model.scores(ds.X, ds.y)
    if args.json:
        print(json.dumps(scores))
    else:
        for name, value in scores.items():
            print(f"{name} {value:.6g}")
    return 0


def predict(args) -> int:
    """`distnn predict MODEL DATA -o OUT.csv`: mean response per row, and labels for classifiers."""
    _check_output(args.output, args.model, args.data)
    model, ds = _model_data(args, require_target=False)  # data to predict on needs no labels
    mean = model.mean(ds.X)
    columns = prediction_columns(model)
    labels = model.predict_labels(ds.X) if model.is_classifier else None
    labels = None if labels is None else labels.reshape(len(mean), -1)

    def write(f):
        out = csv.writer(f)
        out.writerow(columns)
        for i, row in enumerate(mean):
            # str of a numpy float is its shortest round-trip text: reading it back gives the bits
            out.writerow([str(v) for v in row] + ([] if labels is None else list(labels[i])))

    # an existing file stays whole until the new one is; a link or FIFO is written through
    write_atomically(args.output, write, through=True)
    print(f"{len(mean)} predictions -> {args.output}")
    return 0


def _check_output(out, model, source) -> None:
    """predict -o must not replace its own input, nor a file of a run directory."""
    for what, path in (("model", model), ("data", source)):
        if os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
            raise UsageError(f"-o {out}: is the {what} file {path}; predicting would overwrite "
                             f"it, so write to another file")
    target = Path(out).resolve()  # through a link: where the predictions would land
    if rundir.is_run_file(target):
        raise UsageError(f"-o {out}: is a file of the run directory {target.parent}; write the "
                         f"predictions to another file")


def prediction_columns(model) -> list[str]:
    """p_<class> per class (+ label); p / p_j (+ label / label_j) per Bernoulli output; mean /
    mean_j."""
    k, family = model.net.sizes[-1], model.family
    if family.labels:
        return [f"p_{c}" for c in model.classes] + ["label"]
    name = "p" if family.per_output else "mean"
    names = [name] if k == 1 else [f"{name}_{j}" for j in range(k)]
    if family.per_output:
        names += ["label"] if k == 1 else [f"label_{j}" for j in range(k)]
    return names


def info(args) -> int:
    """`distnn info MODEL`: architecture, size, inputs, classes and how training went."""
    model = load_model(args.model)
    net, meta = model.net, model.meta
    features = meta.get("features") or []
    lines = [("model", args.model),
             ("network", f"{' -> '.join(map(str, net.sizes))}  ({net.activation} hidden, "
                         f"{net.family} output)"),
             ("params", f"{net.n_params:,} {net.dtype.name}  (l1 {net.l1:g}, l2 {net.l2:g})"),
             # the parameters' bytes: deterministic runs at any rank count print the same digest
             ("digest", "sha256 " + hashlib.sha256(net.params.tobytes()).hexdigest()[:16]),
             ("inputs", f"{net.sizes[0]} features"
                        f"{', standardized' if model.scaler is not None else ''}: "
                        f"{_shorten(features)}"),
             ("target", str(meta.get("target") or "?"))]
    if model.classes is not None:
        lines.append(("classes", f"{len(model.classes)}: {_shorten(model.classes.tolist())}"))
    m = meta.get("metrics") or {}
    if m:
        lines.append(("trained", f"{meta.get('source', '?')}: {m.get('epochs')} epochs, "
                                 f"{m.get('steps')} steps on {m.get('ranks')} ranks"))
    for split in ("val", "test"):
        if split in m:
            lines.append((split, "  ".join(f"{k} {v:.4g}" for k, v in m[split].items())))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in lines))
    return 0


def _shorten(items, shown=8) -> str:
    items = [str(x) for x in items]
    return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")


# ---------------------------------------------------------------------- shared plumbing

def _say(comm, line, code) -> int:
    """Rank 0 prints the line to stderr; every rank returns `code`."""
    if comm.is_root:
        print(line, file=sys.stderr, flush=True)
    return code


def error_line(e) -> str:
    """'distnn: error: <message>' on one line."""
    message = " ".join(str(e).split()) or type(e).__name__
    return f"distnn: error: {message}"


def _count(low, high):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected a number <= {high}, got {value}")
        return value
    return parse


def parser() -> ArgumentParser:
    """The argument parser of every command but bench (which parses its own); `commands` maps a
    command's name to its subparser."""
    p = ArgumentParser(prog="distnn", description="Data-parallel training of dense feed-forward "
                       "networks over MPI.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.commands = sub.choices
    t = sub.add_parser("train", help="train from a TOML config (under MPI: every rank runs this)")
    t.add_argument("config", help="the TOML config file")
    t.add_argument("-n", "--np", type=_count(1, MAX_RANKS), default=1,
                   help="start NP ranks under mpiexec (default 1: this process)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.l2=1e-4 (repeatable)")
    t.add_argument("--out", help="run directory (default: the config's out_dir)")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the run directory's latest checkpoint, if any")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh even where the run directory holds a finished run or "
                            "checkpoints, replacing them")
    t.add_argument("--threads", type=_count(0, config.MAX_THREADS),
                   help="BLAS threads per rank (default: the config's; 0 = cores / ranks per node)")
    e = sub.add_parser("evaluate", help="metrics of a model on a data set")
    p_ = sub.add_parser("predict", help="write a model's predictions as CSV")
    for s in (e, p_):
        s.add_argument("model", help="a model file (RUN_DIR/model.npz)")
        s.add_argument("data", help="data source: file.csv, file.npz, file.npy, sklearn:NAME, ...")
        s.add_argument("--target", help="target column/array (default: the model's)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    p_.add_argument("-o", "--output", required=True, help="the CSV file to write")
    sub.add_parser("info", help="describe a model").add_argument("model")
    pl = sub.add_parser("plot", help="curves.png from a run's metrics.jsonl")
    pl.add_argument("run_dir")
    pl.add_argument("-o", "--output", help="PNG to write (default RUN_DIR/curves.png)")
    sub.add_parser("bench", help="the benchmark suite (distnn bench --help)", add_help=False)
    return p


COMMANDS = {"train": train, "evaluate": evaluate, "predict": predict, "info": info, "plot": plot}


def main(argv=None) -> int:
    """Entry point of `distnn` and `python -m distnn`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from . import bench

        return bench.main(argv[1:]) or 0
    p = parser()
    args, unknown = p.parse_known_args(argv)  # a bad flag: one line and exit code 2
    if unknown:  # said by the command's parser, which names the command
        p.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distnn: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
