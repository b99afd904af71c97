"""Array-API expressions with a faster path on one namespace and the same arithmetic per
row on every batch size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from array_api_compat import device, is_numpy_namespace
from numpy.lib.stride_tricks import as_strided


def rowdot(xp: Any, a: Any, b: Any) -> Any:
    """Row-wise inner products of two (B, n) arrays: (B,), each row's rounding depending
    only on its own entries (not on B nor on the row's place in memory): NumPy's ``einsum``
    loop, else a row sum of the product.  Not ``vecdot``: BLAS ``ddot`` rounds with the
    row's memory alignment on some kernels (OpenBLAS Prescott)."""
    if is_numpy_namespace(xp):
        return np.einsum("ij,ij->i", a, b)
    return xp.sum(a * b, axis=-1)


def flipped_windows(xp: Any, padded: Any, k: int, windows: Sequence[tuple]) -> Any:
    """The K² windows ``padded[windows[a·K + c]]`` = P[2r − a + i, 2r − c + j, :] of an
    (h + 2r, w + 2r, m) array stacked as (K², h·w·m); NumPy copies one strided view."""
    if not is_numpy_namespace(xp):
        return xp.reshape(xp.stack([padded[win] for win in windows], axis=0), (k * k, -1))
    r = k // 2
    s0, s1, s2 = padded.strides
    h, w, m = padded.shape[0] - 2 * r, padded.shape[1] - 2 * r, padded.shape[2]
    view = as_strided(padded[2 * r:, 2 * r:], (k, k, h, w, m), (-s0, -s1, s0, s1, s2),
                      writeable=False)
    return np.reshape(np.ascontiguousarray(view), (k * k, -1))


def shifted_sum(xp: Any, mixed: Any, k: int, windows: Sequence[tuple], *,
                full: bool = False) -> Any:
    """Σ_{a,c} of plane a·K + c of ``mixed`` (K², h, w, m) shifted by (a − r, c − r), zero
    outside: out[i, j] = Σ mixed[a·K + c, i + a − r, j + c − r], (h, w, m), adding the
    planes in order a·K + c; NumPy sums a strided view for m = 1 (slower for m > 1).
    ``full``: the whole (h + 2r, w + 2r, m) sum in the padded frame (the adjoint of the
    windows ``padded[windows[a·K + c]]`` alone; its interior is the cropped result), a
    fresh array."""
    _, h, w, m = mixed.shape
    r = k // 2
    if is_numpy_namespace(xp) and m == 1:
        e = 2 * r if full else r  # the view starts e − r before the interior
        padded = np.zeros((k * k, h + 2 * e, w + 2 * e, 1), dtype=mixed.dtype)
        padded[:, e:e + h, e:e + w, :] = mixed
        s0, s1, s2, s3 = padded.strides
        oh, ow = h + 2 * (e - r), w + 2 * (e - r)
        view = as_strided(padded, (k, k, oh, ow, 1), (k * s0 + s1, s0 + s2, s1, s2, s3),
                          writeable=False)
        return np.sum(view, axis=(0, 1))
    buf = xp.zeros((h + 2 * r, w + 2 * r, m), dtype=mixed.dtype, device=device(mixed))
    for i, win in enumerate(windows):
        buf[win] += mixed[i, ...]
    return buf if full else buf[r:r + h, r:r + w, :]
