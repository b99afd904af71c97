"""BLAS/OpenMP thread limits of a run, through threadpoolctl: ``num_threads`` or, when
null, one thread on the host backends except every core for dense problems of at least
``DENSE_THREADED_ENTRIES`` entries; device backends (CuPy) are left alone (README, "Threads").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from threadpoolctl import threadpool_info, threadpool_limits

# Backends whose arithmetic runs in the host's BLAS/OpenMP pools.
HOST_BACKENDS = ("numpy", "array_api_strict", "torch")
# Dense matrices of at least this many entries (a 1024 × 1024 matrix) get every core.
DENSE_THREADED_ENTRIES = 1024 * 1024


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_num_threads(backend: str, requested: int | None, *,
                       dense_entries: int = 0) -> int | None:
    """The thread limit for a run on ``backend`` (None: leave the pools alone), chosen as the
    module doc says from ``requested`` (``backend.num_threads``) and ``dense_entries``."""
    if backend not in HOST_BACKENDS:
        return None
    if requested is not None:
        return int(requested)
    if dense_entries >= DENSE_THREADED_ENTRIES:
        return available_cores()
    return 1


def pool_threads() -> int | None:
    """The largest thread count threadpoolctl reports for the BLAS pools; None without BLAS."""
    return max((int(p["num_threads"]) for p in threadpool_info() if p["user_api"] == "blas"),
               default=None)


@contextmanager
def limited_threads(num_threads: int | None) -> Iterator[int | None]:
    """Limit the BLAS and OpenMP pools to ``num_threads`` inside the block (restored on
    exit); yields the BLAS thread count threadpoolctl then reports."""
    with nullcontext() if num_threads is None else threadpool_limits(limits=int(num_threads)):
        yield pool_threads()
