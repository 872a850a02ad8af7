"""distnn: data-parallel training of dense feed-forward networks over MPI."""
