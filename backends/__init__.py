"""Pick an array namespace, device and dtype for a run: the only place that knows which
array libraries exist (everything else takes its namespace from the arrays it is handed)."""

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
