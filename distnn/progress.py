"""A run's progress: the per-epoch log (metrics.jsonl, one line on stdout, a tqdm bar) and
curves.png drawn from metrics.jsonl.

One summary line per epoch on stdout, and a tqdm bar below them when stdout is a terminal
(DISTNN_PROGRESS=1 forces it on, =0 off; `train -n` sets it for its ranks, whose stdout is
mpiexec's pipe). Bar and lines share stdout: through mpiexec two streams would interleave.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from .atomic import write_atomically
from .data import DataError

PLOTTED = ("loss", "val_loss", "accuracy", "val_accuracy")


class EpochLog:
    """The trainer's per-epoch callback on the rank that reports: appends the record to
    metrics.jsonl, prints its line and moves the bar."""

    def __init__(self, path, epochs):
        self.path, self.epochs, self.bar = Path(path), epochs, None

    def __call__(self, record):
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

    def showing(self, done):
        """Context: a tqdm bar over the epochs, `done` of them already, while training."""
        from tqdm import tqdm

        env = os.environ.get("DISTNN_PROGRESS")
        show = env == "1" or (env != "0" and is_terminal(sys.stdout))
        self.bar = tqdm(total=self.epochs, initial=done, unit="epoch", disable=not show,
                        leave=False, dynamic_ncols=True, file=sys.stdout)
        return self.bar


class Silent:
    """The epoch log of the ranks that do not report: the trainer calls its callback on every rank."""

    def __call__(self, record):
        pass

    def showing(self, done):
        return contextlib.nullcontext()


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal; a closed stdout (`>&-`) is None in Python, and not one."""
    return stream is not None and stream.isatty()


def epoch_line(r, epochs) -> str:
    """One concise line per epoch: epoch, losses, accuracies, seconds."""
    names = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc",
             "epsilon": "ε"}
    parts = [f"epoch {r['epoch']}/{epochs}"]
    parts += [f"{short} {r[key]:.4g}" for key, short in names.items() if key in r]
    return "  ".join(parts + [f"{r['seconds']:.2f}s"])


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


def _epoch_record(r) -> bool:
    """A dict with an integer epoch and a number (or null) for each plotted key it has."""
    def number(v):
        return v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
    return (isinstance(r, dict) and isinstance(r.get("epoch"), int)
            and not isinstance(r["epoch"], bool) and all(number(r[k]) for k in PLOTTED if k in r))


def penalty(l1, l2) -> str:
    """The penalty the training loss includes: "L1", "L2", "L1 + L2", or "" for none."""
    return " + ".join(name for name, weight in (("L1", l1), ("L2", l2)) if weight)


def curve_labels(penalty) -> dict:
    """Legend labels of the plotted keys; the training loss includes the model's `penalty` (see
    penalty(); None: not known), the validation loss never does."""
    if penalty is None:
        train, val = "train loss (incl. the L1/L2 penalty, if any)", "val loss (no penalty)"
    elif penalty:
        train, val = f"train loss (incl. {penalty} penalty)", "val loss (no penalty)"
    else:
        train, val = "train loss", "val loss"
    return {"loss": train, "val_loss": val, "accuracy": "train accuracy",
            "val_accuracy": "val accuracy"}


def curves_figure(records, penalty=None):
    """Loss and validation loss (and accuracies, for classifiers) against the epoch: a matplotlib
    Figure; `penalty` as curve_labels takes it."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    labels = curve_labels(penalty)
    panels = [("loss", "val_loss")] + [("accuracy", "val_accuracy")] * ("accuracy" in records[0])
    fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    epochs = [r["epoch"] for r in records]
    for ax, keys in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        for key in keys:
            if key in records[0]:
                ax.plot(epochs, [r.get(key, np.nan) for r in records], marker=".",
                        label=labels[key])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(keys[0])
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_curves(records, path, through=False, penalty=None) -> None:
    """curves_figure(records, penalty) as a PNG at `path`; `through` as in
    atomic.write_atomically."""
    fig = curves_figure(records, penalty)
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True,
                     through=through)
