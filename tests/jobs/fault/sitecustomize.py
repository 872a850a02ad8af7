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
  stallin    that rank sleeps for an hour in STEP, a function of the set-up or the finish:
             prepare (loading the data) or save_model (rank 0 writing the final model)
"""

import os
import signal

_SPEC = os.environ.get("DISTNN_TEST_FAULT")
if _SPEC or os.environ.get("DISTNN_TEST_SIGNAL"):
    # `distnn train` holds SIGTERM/SIGINT from its first line until its handlers are in; the
    # imports below run before that line, so hold them here first, as it would
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))

if _SPEC:
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

    def _faulty_step(self, X, Y, rows, transform=None, weights=None):
        if _MODE == "termslow" and self.step == int(_STEP) and self.comm.rank == int(_RANK):
            verdict = _original(self, X, Y, rows, transform, weights)
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
                return _original(self, X, Y, rows, lambda part: np.full_like(part, np.nan),
                                 weights)
        return _original(self, X, Y, rows, transform, weights)

    distnn.trainer.Trainer.train_batch = _faulty_step

    if _MODE == "stallin":
        import distnn.run
        import distnn.rundir

        _module = {"prepare": distnn.run, "save_model": distnn.rundir}[_STEP]
        _work = getattr(_module, _STEP)

        def _stalling(*args, **kwargs):
            if os.environ.get("PMI_RANK") == _RANK:
                time.sleep(3600)
            return _work(*args, **kwargs)

        setattr(_module, _STEP, _stalling)

# DISTNN_TEST_SIGNAL=POINT:SIGNAL (e.g. data:SIGINT): rank 0 sends SIGNAL to the `train -n`
# launcher whose pid the test wrote to DISTNN_TEST_LAUNCHER_PID, the first time the run reaches
# POINT, and lingers there so that the forwarded signal arrives inside it:
#   start       before the signal handlers are installed (the signal is held), before MPI starts
#   data        while every rank loads the data
#   step        before training step 5
#   checkpoint  while rank 0 writes the checkpoint of step 10
#   model       while rank 0 writes the final model.npz
#   done        after rank 0 wrote done.json
_SIGNAL = os.environ.get("DISTNN_TEST_SIGNAL")

if _SIGNAL:
    import functools
    import time

    import distnn.checkpoint
    import distnn.run
    import distnn.rundir
    import distnn.stopping
    import distnn.trainer

    _POINT, _NAME = _SIGNAL.split(":")
    _fired = []

    def _fire(point, linger=0.5):
        if point != _POINT or _fired or os.environ.get("PMI_RANK", "0") != "0":
            return
        _fired.append(point)
        with open(os.environ["DISTNN_TEST_LAUNCHER_PID"]) as f:
            os.kill(int(f.read()), getattr(signal, _NAME))
        time.sleep(linger)  # the launcher forwards it through mpiexec to every rank meanwhile

    def _before(point, fn, when=lambda *a, **k: True):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if when(*args, **kwargs):
                _fire(point)
            return fn(*args, **kwargs)
        return wrapped

    distnn.stopping.StopRequest.install = _before("start", distnn.stopping.StopRequest.install)
    distnn.run.prepare = _before("data", distnn.run.prepare)
    distnn.trainer.Trainer.train_batch = _before(
        "step", distnn.trainer.Trainer.train_batch, lambda self, *a, **k: self.step == 4)
    distnn.checkpoint.save = _before(
        "checkpoint", distnn.checkpoint.save, lambda path, *a, **k: str(path).endswith("ckpt-000000010.npz"))
    distnn.rundir.save_model = _before("model", distnn.rundir.save_model)
    _write_json = distnn.rundir._write_json

    def _then_fire(path, obj):
        _write_json(path, obj)
        if path.name == distnn.rundir.DONE:
            _fire("done")

    distnn.rundir._write_json = _then_fire
