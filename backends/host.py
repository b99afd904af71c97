"""Moving small arrays from any supported device to the host."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of ``a`` (NumPy, CuPy, PyTorch, array-api-strict on any device), for the
    solvers' documented small transfers and checkpoints; a device synchronisation on GPUs."""
    if isinstance(a, np.ndarray):
        return a.copy()
    if hasattr(a, "get"):  # CuPy
        return np.asarray(a.get())
    if hasattr(a, "detach"):  # PyTorch
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("array_api_strict"):
        return np.asarray(a.to_device(a.__array_namespace__().Device("CPU_DEVICE")))
    return np.array(a, copy=True)


def host_list(a: Any) -> list:
    """The values of a small 1-D array as a Python list (no copy for NumPy)."""
    return (a if isinstance(a, np.ndarray) else to_host(a)).tolist()


def host_check_needs_sync(a: Any) -> bool:
    """Whether reading a value of ``a`` on the host waits for a GPU (CuPy or CUDA PyTorch)
    and stalls its queue; on the CPU a host check costs nothing."""
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return True
    dev = getattr(a, "device", None)
    return getattr(dev, "type", None) == "cuda"
