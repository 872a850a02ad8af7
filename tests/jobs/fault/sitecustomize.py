"""Fault injection for tests/test_failures.py, active only when DISTNN_TEST_FAULT is set.

Put this folder on PYTHONPATH and set DISTNN_TEST_FAULT=MODE:RANK:STEP; every Python process of
the job (mpiexec passes the environment on) then misbehaves on rank RANK before training step STEP:
  raise   an exception (a bug, bad data only that rank reads)
  kill    SIGKILL of that rank
  exit0   the rank exits with status 0 mid-run (mpiexec alone would report success)
  stall   the rank sleeps for an hour without exiting
  nan     that rank's gradient becomes NaN (every rank sees it after the allreduce)
  sigterm SIGTERM to that rank only (the ranks must agree to stop at the same step)
  stallterm  that rank stalls and every other rank gets SIGTERM, with a 2 s stop grace
  termslow   SIGTERM to that rank after the step, every checkpoint takes 3 s, a 1 s stop grace
"""

import os

_SPEC = os.environ.get("DISTNN_TEST_FAULT")

if _SPEC:
    import signal
    import time

    import numpy as np

    import distnn.stopping
    import distnn.trainer

    _MODE, _RANK, _STEP = _SPEC.split(":")
    _original = distnn.trainer.Trainer.train_batch
    if _MODE == "stallterm":
        distnn.stopping.STOP_GRACE_S = 2.0
    if _MODE == "termslow":
        import distnn.checkpoint

        distnn.stopping.STOP_GRACE_S = 1.0
        _save = distnn.checkpoint.save

        def _slow_save(*args, **kwargs):
            time.sleep(3.0)  # slow but healthy: longer than the stop grace
            return _save(*args, **kwargs)

        distnn.checkpoint.save = _slow_save

    def _faulty_step(self, X, Y, rows, transform=None):
        if _MODE == "termslow" and self.step == int(_STEP) and self.comm.rank == int(_RANK):
            verdict = _original(self, X, Y, rows, transform)
            os.kill(os.getpid(), signal.SIGTERM)  # seen by the others at the next step
            return verdict
        if _MODE == "stallterm" and self.step == int(_STEP):
            if self.comm.rank == int(_RANK):
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGTERM)
        if self.comm.rank == int(_RANK) and self.step == int(_STEP):
            if _MODE == "raise":
                raise RuntimeError(f"injected failure on rank {_RANK} at step {_STEP}")
            if _MODE == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if _MODE == "exit0":
                os._exit(0)
            if _MODE == "stall":
                time.sleep(3600)
            if _MODE == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            if _MODE == "nan":
                return _original(self, X, Y, rows, lambda part: np.full_like(part, np.nan))
        return _original(self, X, Y, rows, transform)

    distnn.trainer.Trainer.train_batch = _faulty_step
