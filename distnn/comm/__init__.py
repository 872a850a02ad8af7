"""The seam between the math and MPI: the only distnn package that imports mpi4py.

    collectives.py   Comm: allreduce (bucketed, or through node shared memory), broadcasts,
                     agreement, failing together, the exact sum, abort
    watchdog.py      every collective against a deadline; a stalled peer ends the job
    shared.py        the node shared-memory window and its named steps (fence, sum a slice, ...)
    errors.py        RankError, one exception on every rank, the job-ending excepthook

It knows collectives, deadlines and shared memory, nothing of trainers or optimizers. Importing
it does not start MPI (importing mpi4py does): `Comm`, `world` and `connect` load it on first use.
"""
from .errors import RankError, install_excepthook

__all__ = ["Comm", "RankError", "connect", "install_excepthook", "world"]


def connect(comm=None, **options):
    """`comm` itself if it is a Comm, else a Comm over it (None: MPI.COMM_WORLD) with options
    (timeout, bucket_bytes, shared_memory)."""
    from .collectives import Comm

    return comm if isinstance(comm, Comm) else Comm(comm, **options)


def world(**options):
    """A Comm over MPI.COMM_WORLD; options as for Comm."""
    return connect(None, **options)


def __getattr__(name):
    if name == "Comm":
        from .collectives import Comm

        return Comm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
