"""Array-API expressions with a faster path on one namespace and the same arithmetic per
row on every batch size."""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import is_numpy_namespace


def rowdot(xp: Any, a: Any, b: Any) -> Any:
    """Row-wise inner products of two (B, n) arrays: (B,).  Each row's rounding depends
    only on its own entries, not on B nor on where the row lies in memory: NumPy's
    ``einsum`` loop (about twice as fast as the generic form at B = 16, n = 784), else an
    elementwise product summed along the row.  Not ``vecdot``: it calls BLAS ``ddot``,
    which rounds with the row's memory alignment on some kernels (OpenBLAS Prescott)."""
    if is_numpy_namespace(xp):
        return np.einsum("ij,ij->i", a, b)
    return xp.sum(a * b, axis=-1)
