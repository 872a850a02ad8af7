"""How training stops early: a signal agreed on by every rank, divergence, early stopping."""
import math
import signal
import threading

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


class StopRequest:
    """A stop asked for on this rank (SIGTERM/SIGINT, or `ask`): the next step's sum carries it
    to every rank, and every rank stops after that same step. Until then the comm hurries: a
    stalled peer must not hold a job asked to stop."""

    def __init__(self, comm):
        self.comm = comm
        self.signum = 0  # the signal asked for on this rank, 0 if none
        self.agreed = False  # every rank knows: stop after this step
        self.step_s = 0.0  # the last step's seconds: the grace is at least a few of them

    def ask(self, signum=signal.SIGTERM, frame=None):
        """Ask every rank to stop after the next step (the signal handler)."""
        self.signum = signum
        if not self.agreed:  # a late copy of the signal: the stop is under way
            self.comm.hurry(max(STOP_GRACE_S, 4 * self.step_s))

    def agree(self, stop):
        """The step's verdict: whether some rank asked."""
        self.agreed = stop
        if stop:
            self.comm.hurry(None)  # every rank is here: the checkpoint may take its time

    def __enter__(self):
        self.signum, self.agreed = 0, False  # a signal of an earlier fit is spent
        self.comm.hurry(None)  # and so is its hurry
        main = threading.current_thread() is threading.main_thread()  # handlers live there only
        self.saved = {s: signal.signal(s, self.ask) for s in (signal.SIGTERM, signal.SIGINT)
                      if main}
        return self

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)
        self.comm.hurry(None)  # a stop asked for too late to be agreed: training ended

    def interrupted(self, where, checkpoint):
        """The Interrupted error to raise once the stop is agreed and the checkpoint written."""
        signum = self.signum or signal.SIGTERM  # a peer's signal stops this rank too
        saved = f"checkpoint written to {checkpoint}" if checkpoint else "no checkpoint_dir, nothing saved"
        return Interrupted(f"stopped by {signal.Signals(signum).name} at {where}; {saved}", signum)


def diverged(where, checkpoints):
    """The DivergenceError at `where`, naming the last good checkpoint if there is one."""
    kept = (f"the last good checkpoint, {checkpoints[-1]}, is kept" if checkpoints
            else "no checkpoint was written before it")
    return DivergenceError(
        f"training diverged at {where}: the loss or gradient is NaN/Inf ({kept}); lower the "
        f"learning rate (optim.lr), add gradient clipping (optim.clip_norm) or standardize "
        f"the inputs")


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
