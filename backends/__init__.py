"""Pick an array namespace, device and dtype for a run.

This is the only place that knows which array libraries exist.  Everything else gets
its namespace from the arrays it is handed (``array_api_compat.array_namespace``).
"""

from backends.core import (
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    tune_cpu_allocator,
)

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "tune_cpu_allocator",
]
