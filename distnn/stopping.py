"""How training stops early: a signal agreed on by every rank, divergence, early stopping."""
import contextlib
import functools
import math
import signal
import threading

import numpy as np

from . import checkpoint

# After SIGTERM/SIGINT, how long the peers may take to reach the step that agrees on stopping:
# this, or four of the last step's durations if that is longer (a slow step is no stall)
STOP_GRACE_S = 30.0


class DivergenceError(RuntimeError):
    """The loss or gradient became NaN/Inf; raised on every rank at the same step."""


class Interrupted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT at a step boundary, after writing a checkpoint (if
    there is a checkpoint_dir), or the set-up stopped before training."""

    def __init__(self, message, signum=signal.SIGTERM, checkpoint=None):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint  # the checkpoint written, to resume from


class StopRequest:
    """A stop asked for on this rank (SIGTERM/SIGINT, or `ask`), carried to every rank at the next
    agreement: a training step's sum, or `check` between the stages of a run's set-up. Until then
    the comm hurries: a stalled peer must not hold a job asked to stop.

    A signal only records the request: an exception raised inside a collective would leave the
    peers waiting in it. Work on this rank alone may be cut short at once (`interruptible`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, comm=None):
        self.comm = comm  # set before the first agreement; may be None until then
        self.signum = 0  # the signal asked for on this rank, 0 if none
        self.agreed = False  # every rank knows: stop after this step
        self.step_s = 0.0  # the last step's seconds: the grace is at least a few of them
        self._saved = None  # the handlers ours replaced, while installed
        self._cut = False  # inside `interruptible`: a signal ends the work at once

    def ask(self, signum=signal.SIGTERM, frame=None):
        """Ask every rank to stop at the next agreement (the signal handler)."""
        self.signum = signum
        if self.comm is not None and not self.agreed:  # a late copy of the signal: under way
            self.comm.hurry(max(STOP_GRACE_S, 4 * self.step_s))
        if self._cut:
            self._cut = False
            raise _Cut

    def agree(self, stop):
        """The step's verdict: whether some rank asked."""
        self.agreed = stop
        if stop:
            self.comm.hurry(None)  # every rank is here: the checkpoint may take its time

    def check(self, where):
        """Collective: raise Interrupted on every rank if a signal came to any of them."""
        asked = np.array([self.signum], np.int64)
        self.comm.allreduce_max(asked, f"stop check {where}")
        if asked[0]:
            self.agree(True)
            signum = self.signum or int(asked[0])  # a peer's signal stops this rank too
            raise Interrupted(f"stopped by {signal.Signals(signum).name} {where}", signum)

    def interruptible(self, fn):
        """fn, cut short by a signal while it runs (work on this rank alone: no collectives);
        its result, or None when cut: the `check` that must follow stops every rank."""
        @functools.wraps(fn)
        def run(*args):
            try:
                self._cut = True
                try:
                    return None if self.signum else fn(*args)
                finally:
                    self._cut = False
            except _Cut:  # also from inside the finally: the outer try holds it
                return None
        return run

    @property
    def installed(self) -> bool:
        return self._saved is not None

    @classmethod
    def held(cls) -> bool:
        """Whether SIGTERM and SIGINT are blocked: `distnn train` holds them from its first line
        (__main__.py) until `install`, for this process's run."""
        return set(cls.SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, ())

    def install(self):
        """SIGTERM and SIGINT ask for a stop from now on, and are unblocked: one that came while
        they were held arrives now. In the main thread only: Python runs handlers there alone."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return self
        self._saved = {s: signal.signal(s, self.ask) for s in self.SIGNALS}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def uninstall(self):
        """The handlers `install` replaced, back."""
        for s, h in (self._saved or {}).items():
            signal.signal(s, h)
        self._saved = None

    @contextlib.contextmanager
    def watching(self):
        """Context of a fit: signals ask for a stop inside it, a fresh request each time (a
        signal of an earlier fit is spent). Where the handlers are installed already (the
        command line installs them at launch, for the whole run) it changes nothing: a signal
        that came before is this fit's to honour."""
        if self.installed:
            yield self
            return
        self.signum, self.agreed = 0, False
        if self.comm is not None:
            self.comm.hurry(None)  # and so is its hurry
        self.install()
        try:
            yield self
        finally:
            self.uninstall()
            if self.comm is not None:
                self.comm.hurry(None)  # a stop asked for too late to be agreed: training ended

    def interrupted(self, where, checkpoint):
        """The Interrupted error to raise once the stop is agreed and the checkpoint written."""
        signum = self.signum or signal.SIGTERM  # a peer's signal stops this rank too
        saved = f"checkpoint written to {checkpoint}" if checkpoint else "no checkpoint_dir, nothing saved"
        return Interrupted(f"stopped by {signal.Signals(signum).name} at {where}; {saved}", signum,
                           checkpoint)


class _Cut(BaseException):
    """Raised by the signal handler inside `StopRequest.interruptible` only; never escapes it.
    A BaseException, as KeyboardInterrupt: an `except Exception` in the work does not swallow it."""


def diverged(where, checkpoints, history):
    """The DivergenceError at `where`, naming the newest checkpoint with its epoch and training
    loss (from `history`, the epoch records), and calling it good only if that loss is sane."""
    if not checkpoints:
        kept = "no checkpoint was written before it"
    else:
        path = checkpoints[-1]
        step = checkpoint.step_of(path)
        before = [r for r in history if r["step"] <= step]
        if not before:
            kept = f"the newest checkpoint, {path} (step {step}, in the first epoch), is kept"
        else:
            facts = (f"{path} (epoch {before[-1]['epoch']}, step {step}, training loss "
                     f"{before[-1]['loss']:.4g})")
            grown = exploded(before)
            kept = (f"the last good checkpoint, {facts}, is kept" if grown is None else
                    f"the newest checkpoint, {facts}, is kept, but its loss had already {grown}: "
                    f"train afresh (--overwrite) rather than resume it")
    return DivergenceError(
        f"training diverged at {where}: the loss or gradient is NaN/Inf ({kept}); lower the "
        f"learning rate (optim.lr), add gradient clipping (optim.clip_norm) or standardize "
        f"the inputs")


EXPLODED = 100.0  # a training loss this many times its lowest (above it) is no longer sane


def exploded(history) -> str | None:
    """How the last epoch's training loss went wrong ("become inf", "grown from 0.52 to
    1.1e+259"), or None while it stays within EXPLODED times its lowest."""
    if not history:
        return None
    last = history[-1]["loss"]
    if not math.isfinite(last):
        return f"become {last}"
    lowest = min(r["loss"] for r in history)
    if last - lowest > EXPLODED * max(abs(lowest), 1e-12):
        return f"grown from {lowest:.4g} to {last:.4g}"
    return None


class EarlyStopping:
    """Stop after `patience` epochs without a better validation loss, keeping the best
    parameters; decided from reduced numbers, so every rank stops after the same epoch."""

    def __init__(self, patience):
        self.patience = patience
        self.best = {"val_loss": math.inf, "bad_epochs": 0}
        self.params = None  # the parameters at the best validation loss

    def update(self, val_loss, params) -> bool:
        """Record an epoch's validation loss; whether to stop now."""
        if not self.patience:
            return False
        if val_loss < self.best["val_loss"]:
            self.best = {"val_loss": val_loss, "bad_epochs": 0}
            self.params = params.copy()
            return False
        self.best["bad_epochs"] += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        return bool(self.patience) and self.best["bad_epochs"] >= self.patience
