"""Backend selection: ``get_backend(name, dtype=..., device=...) -> Backend``."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.host import to_host


class BackendUnavailableError(RuntimeError):
    """The requested array library or device is not usable on this machine."""


@dataclass(frozen=True)
class Backend:
    """An array namespace bound to one device and one floating dtype."""

    name: str
    xp: Any = field(repr=False)
    device: Any
    dtype: Any

    def asarray(self, data: Any, *, dtype: Any = None) -> Any:
        """Copy host data (NumPy array, list, scalar) to this backend's device."""
        host = np.asarray(data)
        if dtype is None and np.issubdtype(host.dtype, np.floating):
            dtype = self.dtype
        return self.xp.asarray(host, dtype=dtype, device=self.device)

    to_numpy = staticmethod(to_host)  # a NumPy copy of a (small) array

    def zeros(self, shape: int | tuple[int, ...]) -> Any:
        return self.xp.zeros(shape, dtype=self.dtype, device=self.device)


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can be constructed on this machine."""
    names = []
    for name in BACKEND_NAMES:
        with contextlib.suppress(BackendUnavailableError):
            get_backend(name)
            names.append(name)
    return tuple(names)


def _dtype(xp: Any, dtype: Any) -> Any:
    if not isinstance(dtype, str):
        return dtype
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return getattr(xp, dtype)


def _import(module: str, hint: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend needs the '{module}' package, which is not installed: {hint}"
        ) from exc


def _numpy_backend(dtype: Any, device: Any) -> Backend:
    if device not in (None, "cpu"):
        raise ValueError(f"NumPy runs on the CPU only; device={device!r} is not valid")
    return Backend("numpy", np, "cpu", _dtype(np, dtype))


def _strict_backend(dtype: Any, device: Any) -> Backend:
    xp = _import("array_api_strict", "pip install 'hyperkrylov[test]'")
    info = xp.__array_namespace_info__()
    dev = xp.Device(device) if isinstance(device, str) else device or info.default_device()
    if dev not in info.devices():
        raise ValueError(f"array_api_strict has no device {device!r}; "
                         f"choose one of {info.devices()}")
    return Backend("array_api_strict", xp, dev, _dtype(xp, dtype))


def _cupy_backend(dtype: Any, device: Any) -> Backend:
    cp = _import("cupy", "pip install 'hyperkrylov[gpu]' (CuPy for CUDA 12)")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise BackendUnavailableError(
            f"CuPy is installed but no CUDA device is usable ({exc}); "
            "run on a machine with an NVIDIA GPU and driver, or use backend=numpy"
        ) from exc
    if count == 0:
        raise BackendUnavailableError("CuPy is installed but this machine has no CUDA GPU")
    index = 0 if device in (None, "cuda") else int(str(device).removeprefix("cuda:"))
    if not 0 <= index < count:
        raise ValueError(f"CUDA device {device!r} does not exist ({count} visible)")
    dev = cp.cuda.Device(index)
    xp = importlib.import_module("array_api_compat.cupy")
    return Backend("cupy", xp, dev, _dtype(xp, dtype))


def _torch_backend(dtype: Any, device: Any) -> Backend:
    torch = _import("torch", "pip install 'hyperkrylov[torch]'")
    xp = importlib.import_module("array_api_compat.torch")
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("PyTorch has no usable CUDA device on this machine")
    return Backend("torch", xp, dev, _dtype(xp, dtype))


_FACTORIES = {
    "numpy": _numpy_backend,
    "cupy": _cupy_backend,
    "array_api_strict": _strict_backend,
    "torch": _torch_backend,
}
BACKEND_NAMES = tuple(_FACTORIES)


def get_backend(name: str = "numpy", *, dtype: Any = "float64", device: Any = None) -> Backend:
    """The backend ``name`` (one of ``BACKEND_NAMES``) with floating ``dtype`` on ``device``
    (library default when ``None``).  Raises ``ValueError`` for an unknown name, dtype or
    device and ``BackendUnavailableError`` when the library or its device is missing."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; valid names are {', '.join(BACKEND_NAMES)}")
    return _FACTORIES[name](dtype, device)


def tune_cpu_allocator() -> bool:
    """Keep freed array memory in the process heap (True when applied, a no-op off glibc).

    glibc serves a block above its mmap threshold (at most 32 MiB) with fresh pages from
    ``mmap`` and unmaps them on free, so each such temporary is faulted in again, page by
    page and zeroed by the kernel, at its next allocation; the FoE responses of the BSDS
    preset's 64 crops alone take 100 MB.  ``mallopt``: no ``mmap`` for the heap
    (``M_MMAP_MAX`` = 0, as ``MALLOC_MMAP_MAX_=0``) and its free top given back only beyond
    2 GiB (``M_TRIM_THRESHOLD``), so freed blocks are reused without page faults.  The
    process then keeps its peak heap (at most 2 GiB of it free) until it exits.  Measured
    by ``benchmarks/bench_allocator.py`` (README, "Benchmarks")."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError, TypeError):  # no mallopt (not glibc) or no dlopen(NULL)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4
    ok_mmap = mallopt(m_mmap_max, 0) == 1
    return ok_mmap and mallopt(m_trim_threshold, 2**31 - 1) == 1  # a C int: about 2 GiB
