"""The `distnn` command line: train, evaluate, predict, info, plot, bench.

    distnn train examples/digits.toml -n 2           # starts `mpiexec -n 2` itself
    mpiexec -n 2 distnn train examples/digits.toml   # the same run (or `python -m distnn`)
    distnn evaluate runs/digits                      # the run's held-out rows (--split train|all)
    distnn evaluate runs/digits/model.npz sklearn:digits     # all rows of any data
    distnn predict runs/digits data.csv -o predictions.csv   # a run directory: its model.npz
    distnn info runs/digits
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
import functools
import hashlib
import json
import os
import secrets
import signal
import sys
from pathlib import Path

import numpy as np

from . import config, data, launcher, progress, run, rundir, sources
from .atomic import write_atomically
from .errors import USER_ERRORS, ArgumentParser, UsageError
from .checkpoint import CheckpointError
from .model import load_model, model_path
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
        hint = (comm.is_root and e.checkpoint
                and run.resume_hint(args, Path(e.checkpoint).parent.parent, comm.size))
        return _say(comm, f"distnn: {e}" + (f"\ndistnn: {hint}" if hint else ""), 128 + e.signum)
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
    finished = functools.partial(rundir.finished, cfg.out_dir, token)  # a stale one does not vouch
    code = launcher.run_forwarding_signals(
        [*mpiexec, "-n", str(args.np), sys.executable, "-m", "distnn", *argv], env, finished)
    gone = code == 0 and not finished()
    if gone:
        print("distnn: error: the run ended without its completion record (a rank exited early?)",
              file=sys.stderr)
    # a rank killed, stalled or gone: the ranks could not say how to continue, so say it here
    # (they do after a signal; bad input or divergence would only fail again)
    if gone or code not in (0, 1, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM):
        hint = run.resume_hint(args, cfg.out_dir, args.np)
        if hint:
            print(f"distnn: {hint}", file=sys.stderr)
    return 1 if gone else code


# ---------------------------------------------------------------------------- plots

def plot(args) -> int:
    """`distnn plot RUN_DIR [-o PNG]`."""
    run_dir = Path(args.run_dir)
    out = Path(args.output) if args.output else run_dir / rundir.CURVES
    try:
        # -o names the user's file (written through a link); RUN_DIR/curves.png is replaced
        progress.plot_curves(progress.read_metrics(run_dir / rundir.METRICS), out,
                             through=args.output is not None, penalty=_penalty(run_dir))
    except ImportError:
        raise UsageError("distnn plot needs matplotlib: pip install 'distnn[examples]'") from None
    print(out)
    return 0


def _penalty(run_dir) -> str | None:
    """The penalty in the run's training loss (progress.penalty), from its config.toml; None when
    that cannot be read."""
    saved = run_dir / rundir.CONFIG
    try:  # a FIFO would block the read: only a plain file
        cfg = config.load_config(saved) if saved.is_file() else None
    except config.ConfigError:
        cfg = None
    return None if cfg is None else progress.penalty(cfg.model.l1, cfg.model.l2)


# --------------------------------------------------------------- evaluate, predict, info

def _model_data(args, require_target=True):
    """(model file, model, dataset) for predict; see _load_data."""
    path = model_path(args.model)
    model = load_model(path)
    return path, model, _load_data(model, path, args.data, args.target, require_target)


def _load_data(model, path, source, target, require_target=True) -> data.Dataset:
    """The data set `source` for the model (file `path`); CSV columns are picked by the model's
    feature names. A data set of other width is refused first: its labels cannot be judged before
    that."""
    target = target or model.meta.get("target") or None
    steps = _steps(model)
    features = (model.meta.get("features") if source.lower().endswith(".csv") and not steps
                else None)
    ds = data.load(source, target=target, features=features, require_target=require_target)
    if steps and ds.X.ndim == 2:  # read as the run read its rows: as steps of sequences
        ds = sources.as_steps(ds, steps)
    _same_kind(model, path, ds)
    if ds.n_features != model.net.sizes[0]:
        names = f" ({_shorten(model.meta['features'])})" if model.meta.get("features") else ""
        raise data.DataError(f"{ds.source}: {ds.n_features} features, but the model {path} "
                             f"takes {model.net.sizes[0]}{names}")
    return ds


def _steps(model) -> int:
    """data.steps of the run that trained a recurrent model (each row of a 2-D source read as
    that many steps), else 0."""
    cfg = model.meta.get("config")
    steps = cfg.get("data", {}).get("steps", 0) if isinstance(cfg, dict) else 0
    ok = model.recurrent and isinstance(steps, int) and not isinstance(steps, bool) and steps > 0
    return steps if ok else 0


def _same_kind(model, path, ds) -> None:
    """Sequences (N, T, d) for a recurrent model, rows (N, d) for a dense one."""
    if model.recurrent and ds.X.ndim != 3:
        raise data.DataError(f"{ds.source}: X has shape {ds.X.shape}; the recurrent model {path} "
                             f"takes sequences (N, T, {model.net.sizes[0]})")
    if not model.recurrent and ds.X.ndim != 2:
        raise data.DataError(f"{ds.source}: X holds sequences, shape {ds.X.shape}; the model "
                             f"{path} is dense and takes rows (N, {model.net.sizes[0]})")


SPLITS = ("val", "train", "all")


def evaluate(args) -> int:
    """`distnn evaluate MODEL|RUN_DIR [DATA] [--split S]`: the model's metrics, one `name value`
    per line (or JSON), and on stderr which rows were scored. Without DATA, the run's own data
    source and, by default, its held-out (val) rows; with DATA, all its rows unless --split."""
    path = model_path(args.model)
    model = load_model(path)
    cfg = run_config(args.model, path, model)
    if args.data is None and cfg is None:
        raise UsageError(f"{path}: the model keeps no config of the run that trained it, so it "
                         f"names no data; give the DATA to score")
    source = args.data if args.data is not None else cfg.data.source
    own = cfg is not None and _same_source(source, cfg.data.source)  # the run's split applies
    split = args.split or ("val" if args.data is None else "all")
    if split != "all" and not own:
        why = ("the model keeps no config of the run that trained it" if cfg is None
               else f"{source} is not the run's data source {cfg.data.source}")
        raise UsageError(f"--split {split}: {why}; a split is drawn from the run's own data")
    ds = _load_data(model, path, source, args.target)
    n, rows, trained = len(ds.X), None, None
    if own:  # the rows run.prepare drew: the same function of (rows, val_fraction, seed)
        rows = dict(zip(("train", "val"), data.train_val_split(n, cfg.data.val_fraction,
                                                               cfg.train.seed)))
        if not len(rows["val"]) and split == "val":
            if args.split:
                raise UsageError(f"--split val: the run held out no rows (data.val_fraction = "
                                 f"{cfg.data.val_fraction:g}); use --split train or all")
            split = "all"  # nothing held out: all there is
        trained = {"train": len(rows["train"]), "val": 0, "all": len(rows["train"])}[split]
        rows = rows.get(split)
    X, y = (ds.X, ds.y) if rows is None else (run._Rows(ds.X, rows), ds.y[rows])
    scores = model.scores(X, y, **run._lengths_of(ds.lengths, rows))
    print(_scored(split, len(X), n, source, cfg, own, trained), file=sys.stderr)
    if args.json:
        print(json.dumps(scores | {"split": split, "rows": len(X), "source_rows": n,
                                   "trained_rows": trained}))
    else:
        for name, value in scores.items():
            print(f"{name} {value:.6g}")
    return 0


def run_config(given, path, model) -> config.Config | None:
    """The resolved config of the run that trained the model at `path`: the one its meta keeps,
    else RUN_DIR/config.toml when `given` is that run directory; None for a model saved
    otherwise."""
    if "config" in model.meta:
        try:
            return config.from_dict(model.meta["config"])
        except config.ConfigError as e:
            raise CheckpointError(f"{path}: model field 'config' is not a valid config: "
                                  f"{e}") from None
    saved = Path(given) / rundir.CONFIG
    return config.load_config(saved) if Path(given).is_dir() and saved.is_file() else None


def _same_source(given, source) -> bool:
    """Whether the data source `given` is `source`: the same text, or the same file."""
    try:
        return given == source or os.path.samefile(given, source)
    except (OSError, ValueError):  # a named set (sklearn:...), a missing file, a NUL in the name
        return False


def _scored(split, k, n, source, cfg, own, trained) -> str:
    """One line saying which rows of `source` were scored and whether the model trained on them."""
    if not own:
        why = ("the model keeps no config of the run that trained it" if cfg is None
               else f"not the run's data source {cfg.data.source}")
        return f"scored: all {n} rows of {source} ({why}, so no split applies)"
    if split == "val":
        return f"scored: val split, {k} of {n} rows of {source} (held out from training)"
    if split == "train":
        return f"scored: train split, {k} of {n} rows of {source} (the rows the model trained on)"
    if trained == n:
        return (f"scored: all {n} rows of {source}, all of which the model trained on (the run "
                f"held out none)")
    return (f"scored: all {n} rows of {source}, including the {trained} the model trained on "
            f"(--split val scores the {n - trained} held out)")


def predict(args) -> int:
    """`distnn predict MODEL DATA -o OUT.csv`: mean response per row, and labels for classifiers."""
    _check_output(args.output, model_path(args.model), args.data)
    _, model, ds = _model_data(args, require_target=False)  # data to predict on needs no labels
    lengths = run._lengths_of(ds.lengths)
    mean = model.mean(ds.X, **lengths)
    columns = prediction_columns(model)
    labels = model.predict_labels(ds.X, **lengths) if model.is_classifier else None
    keys = np.empty((len(mean), 0), np.int64)  # per step: each line led by (sequence, step)
    if mean.ndim == 3:
        there = data.alive(ds.lengths, *mean.shape[:2])
        keys = np.argwhere(there)  # (M, 2): sequence, step, in order
        mean, labels = mean[there], None if labels is None else labels[there]
        columns = ["sequence", "step", *columns]
    labels = None if labels is None else labels.reshape(len(mean), -1)

    def write(f):
        out = csv.writer(f)
        out.writerow(columns)
        for i, row in enumerate(mean):
            # str of a numpy float is its shortest round-trip text: reading it back gives the bits
            out.writerow([int(k) for k in keys[i]] + [str(v) for v in row] +
                         ([] if labels is None else list(labels[i])))

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
    """p_<class> per class (+ label); p / p_j (+ label / label_j) per Bernoulli output, or
    p_<label> (+ label) for one trained on two labels; mean / mean_j."""
    k, family = model.net.sizes[-1], model.family
    if family.labels:
        return [f"p_{c}" for c in model.classes] + ["label"]
    if model.classes is not None:  # the probability of the second label
        return [f"p_{model.classes[1]}", "label"]
    name = "p" if family.per_output else "mean"
    names = [name] if k == 1 else [f"{name}_{j}" for j in range(k)]
    if family.per_output:
        names += ["label"] if k == 1 else [f"label_{j}" for j in range(k)]
    return names


def info(args) -> int:
    """`distnn info MODEL|RUN_DIR`: architecture, size, inputs, classes and how training went."""
    path = model_path(args.model)
    model = load_model(path)
    net, meta = model.net, model.meta
    features = meta.get("features") or []
    lines = [("model", str(path)), ("network", _architecture(model)),
             ("params", f"{net.n_params:,} {net.dtype.name}  (l1 {net.l1:g}, l2 {net.l2:g})"),
             # the parameters' bytes: deterministic runs at any rank count print the same digest
             ("digest", "sha256 " + hashlib.sha256(net.params.tobytes()).hexdigest()[:16]),
             ("inputs", f"{net.sizes[0]} features{' per step' if model.recurrent else ''}"
                        f"{', standardized' if model.scaler is not None else ''}: "
                        f"{_shorten(features)}"),
             ("target", str(meta.get("target") or "?"))]
    if model.classes is not None:
        lines.append(("classes", f"{len(model.classes)}: {_shorten(model.classes.tolist())}"))
    m = meta.get("metrics") or {}
    if m:
        lines.append(("trained", f"{meta.get('source', '?')}: {m.get('epochs')} epochs, "
                                 f"{m.get('steps')} steps on {m.get('ranks')} ranks"))
    dp = m.get("privacy")
    if dp:
        lines.append(("privacy", f"(ε {dp['epsilon']:.4g}, δ {dp['delta']:g})-DP by DP-SGD: σ "
                                 f"{dp['noise_multiplier']:.4g}, clip {dp['max_grad_norm']:g}, "
                                 f"q {dp['sample_rate']:.4g}, {dp['steps']} steps"))
    for split in ("val", "test"):
        if split in m:
            lines.append((split, "  ".join(f"{k} {v:.4g}" for k, v in m[split].items())))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in lines))
    return 0


def _architecture(model) -> str:
    """The network line of `info`: sizes, activations, output family; a recurrent model's state,
    state activation and targets too."""
    net = model.net
    if not model.recurrent:
        return (f"{' -> '.join(map(str, net.sizes))}  ({net.activation} hidden, {net.family} "
                f"output)")
    s, sizes = net.state, net.sizes
    inner = [f"{sizes[0]}+{s}", *map(str, sizes[1:-1]), f"{sizes[-1]}+{s}"]
    return (f"recurrent {' -> '.join(inner)}  ([x, r] -> [y, r'], state {s} "
            f"{net.state_activation}, {net.activation} hidden, {net.family} output, targets "
            f"{net.targets})")


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


def _set_hint(argv, unknown) -> str:
    """'; ...' saying how to write, with --set KEY=VALUE, a config key given as a flag (--epochs 5)
    or a --set whose value came apart from its key (--set optim.lr 0.1); else ''."""
    def value_after(i):  # the word after argv[i], if it is a value (a number may start with -)
        v = argv[i + 1] if i + 1 < len(argv) else "-"
        return v if not v.startswith("-") or v[1:2].isdigit() or v[1:2] == "." else "VALUE"

    for i, a in enumerate(argv):
        if a == "--set" and i + 1 < len(argv):
            key, at = argv[i + 1], i + 1
        elif a.startswith("--set="):
            key, at = a[len("--set="):], i
        else:
            continue
        if "=" not in key and value_after(at) != "VALUE":
            return f"; --set takes KEY=VALUE as one word: --set {key}={value_after(at)}"
    for a in unknown:
        if not a.startswith("--"):
            continue
        name, eq, value = a[2:].partition("=")
        value = value if eq else value_after(argv.index(a))
        if config.unsupported(name):
            return f"; {config.unsupported(name)}"
        keys = config.similar_keys(name)
        same = [k for k in keys if k.rpartition(".")[2] == name.replace("-", "_")]
        keys = same or keys
        if len(keys) == 1:
            return f"; to set {keys[0]}, use --set {keys[0]}={value}"
        if keys:
            return f"; to set a config key, use --set KEY={value} ({' or '.join(keys)})"
    return ""


class _Version(argparse.Action):
    """--version: prints "distnn X.Y.Z" and exits; the version is looked up only then (the
    package metadata takes tens of milliseconds to read, which no other command should pay)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print distnn's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        print(f"distnn {__version__}")
        parser.exit()


def parser() -> ArgumentParser:
    """The argument parser of every command but bench (which parses its own); `commands` maps a
    command's name to its subparser."""
    p = ArgumentParser(prog="distnn", description="Data-parallel training of dense feed-forward "
                       "networks over MPI.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.commands = sub.choices
    t = sub.add_parser("train", help="train from a TOML config (under MPI: every rank runs this)")
    t.add_argument("config", help="the TOML config file")
    t.add_argument("-n", "--np", type=_count(1, MAX_RANKS), default=1,
                   help="start NP ranks under mpiexec (default 1: this process); -np NP, as "
                        "mpirun spells it, works too")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.l2=1e-4 (repeatable; every "
                        "key is set this way: --set train.epochs=5, not --epochs 5)")
    t.add_argument("--out", help="run directory (default: the config's out_dir)")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the run directory's latest checkpoint, if any")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh even where the run directory holds a finished run or "
                            "checkpoints, replacing them")
    t.add_argument("--threads", type=_count(0, config.MAX_THREADS),
                   help="BLAS threads per rank (default: the config's; 0 = cores / ranks per node)")
    e = sub.add_parser("evaluate", help="metrics of a model on a data set (default: the run's "
                       "held-out rows)")
    p_ = sub.add_parser("predict", help="write a model's predictions as CSV")
    model_help = "a model file, or a run directory (for its model.npz)"
    for s in (e, p_):
        s.add_argument("model", help=model_help)
    e.add_argument("data", nargs="?", help="data source: file.csv, file.npz, file.npy, "
                   "sklearn:NAME, ... (default: the run's data.source)")
    p_.add_argument("data", help="data source: file.csv, file.npz, file.npy, sklearn:NAME, ...")
    for s in (e, p_):
        s.add_argument("--target", help="target column/array (default: the model's)")
    e.add_argument("--split", choices=SPLITS,
                   help="rows of the run's data to score, as the run split them (default: val "
                        "when no data is given, else all); which rows were scored goes to stderr")
    e.add_argument("--json", action="store_true", help="print one JSON object (the metrics, "
                   "split, rows, source_rows, trained_rows)")
    p_.add_argument("-o", "--output", required=True, help="the CSV file to write")
    sub.add_parser("info", help="describe a model").add_argument("model", help=model_help)
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
    if argv[:1] == ["train"]:
        argv = ["-n" if a == "-np" else a for a in argv]  # mpirun's spelling of -n
    p = parser()
    args, unknown = p.parse_known_args(argv)  # a bad flag: one line and exit code 2
    if unknown:  # said by the command's parser, which names the command
        hint = _set_hint(argv, unknown) if args.command == "train" else ""
        p.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distnn: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
