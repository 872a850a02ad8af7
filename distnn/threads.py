"""Threads per rank: BLAS's (ranks x threads should not exceed the cores, or GEMMs fight for them)
and the rank's own, for element-wise numpy work on large vectors (`run_parallel`).

The share per rank comes from the caller (Comm.blas_share()), so this module needs no MPI.
Deterministic mode pins the thread count too: a different count may change GEMM rounding.
"""
import os
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_info, threadpool_limits

_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_limiter = None  # the live threadpool_limits controller; kept so the limit's owner is visible


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def blas_env(n: int) -> dict[str, str]:
    """Environment variables that give a launched process n BLAS/OpenMP threads."""
    return {name: str(n) for name in _ENV_VARS}


def limit_blas_threads(n: int) -> int:
    """Limit this process (and its children) to n BLAS threads for the rest of its life."""
    global _limiter
    if n < 1:
        raise ValueError(f"BLAS threads must be at least 1, got {n!r}")
    os.environ.update(blas_env(n))  # for child processes; this process's BLAS is already loaded
    _limiter = threadpool_limits(limits=n, user_api="blas")
    return n


def threads_in_force() -> int:
    """The BLAS thread count in force now (1 if no BLAS is loaded)."""
    return max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)


_POOLS = {}  # worker count -> a ThreadPoolExecutor, made once


def run_parallel(fn, items) -> None:
    """fn(item) for every item at once: the first on this thread, the rest on a pool. For numpy
    work on large arrays, whose loops release the GIL; re-raises the first error."""
    later = [_pool(len(items) - 1).submit(fn, item) for item in items[1:]]
    if items:
        fn(items[0])
    for done in later:
        done.result()


def _pool(workers):
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="distnn")
    return _POOLS[workers]
