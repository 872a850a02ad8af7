"""distnn: data-parallel training of dense feed-forward networks over MPI."""

from .network import Network

__all__ = ["Network"]
