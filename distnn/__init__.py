"""distnn: data-parallel training of dense feed-forward networks over MPI."""

from .network import Network
from .optim import SGD, Adam, AdamW

__all__ = ["Network", "Trainer", "SGD", "Adam", "AdamW"]


def __getattr__(name):
    # Trainer imports mpi4py, whose import initializes MPI: only code that trains should pay that
    # (and on some login nodes MPI cannot start at all), not `from distnn import Network`.
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'distnn' has no attribute {name!r}")
