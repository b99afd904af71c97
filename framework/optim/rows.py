"""Counted evaluations of the rows of a batch of iterates (B samples' iterates as the rows
of X (B, n)), and counted host transfers of per-sample scalars (a synchronisation on a GPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from backends.host import to_host
from backends.kernels import rowdot

ValueAndGrad = Callable[[Any], tuple[Any, Any]]
RowsValueAndGrad = Callable[[Any, np.ndarray], tuple[Any, Any]]


def choose(mask: np.ndarray, new: Any, old: np.ndarray) -> np.ndarray:
    """Host (B,) values: ``new`` where ``mask`` holds, else ``old`` (``np.where`` without
    its cost when the mask is uniform)."""
    count = np.count_nonzero(mask)
    if count == len(mask):
        return np.full(mask.shape, new) if np.ndim(new) == 0 else new
    if count == 0:
        return old
    return np.where(mask, new, old)


class RowEvaluator:
    """Evaluations of f and ∇f at the rows of X, and host transfers, for x0 (B, n) or (n,)
    (``single``: promoted to rows ``X0`` (1, n), the caller's functions called on row 0).
    ``evaluations`` counts the calls (one per line-search round, plus the one at x0),
    ``sample_evaluations[i]`` those of sample i, ``host_reads`` the transfers."""

    def __init__(self, x0: Any, fun: Callable[[Any], Any], grad: Callable[[Any], Any], *,
                 value_and_grad: ValueAndGrad | None,
                 rows_value_and_grad: RowsValueAndGrad | None) -> None:
        if x0.ndim not in (1, 2):
            raise ValueError(f"x0 has shape {tuple(x0.shape)}; expected (n,) or (B, n)")
        self.single = x0.ndim == 1
        if self.single and rows_value_and_grad is not None:
            raise ValueError("rows_value_and_grad needs x0 of shape (B, n)")
        self.X0 = x0[None, :] if self.single else x0
        self.xp, self.device = array_api_compat.array_namespace(x0), array_api_compat.device(x0)
        self.bsz = int(self.X0.shape[0])
        self.rows_value_and_grad = rows_value_and_grad
        value_and_grad = value_and_grad or (lambda x: (fun(x), grad(x)))
        self.value_and_grad = _on_row_zero(self.xp, value_and_grad) if self.single \
            else value_and_grad
        self.evaluations = self.host_reads = 0
        self.sample_evaluations = np.zeros(self.bsz, dtype=np.int64)

    def host(self, a: Any) -> np.ndarray:
        """Small device values to the host as float64: the documented, counted transfer."""
        self.host_reads += 1
        return np.asarray(to_host(a), dtype=np.float64)

    def select(self, mask: np.ndarray, new: Any, old: Any) -> Any:
        """Rows of ``new`` ((B,) or (B, n)) where the host ``mask`` holds, else of ``old``
        (no device work when the mask is uniform, always so for B = 1)."""
        count = np.count_nonzero(mask)
        if count == self.bsz:
            return new
        if count == 0:
            return old
        rows = mask.reshape(mask.shape + (1,) * (new.ndim - 1))
        return self.xp.where(self.xp.asarray(rows, device=self.device), new, old)

    def step(self, X: Any, alpha: list[float], P: Any) -> Any:
        """X + diag(α) P for the host steps α (B,); a scalar multiply when all are equal
        (the same products)."""
        if min(alpha) == max(alpha):
            return X + alpha[0] * P
        column = self.xp.asarray(np.array(alpha)[:, None], dtype=X.dtype, device=self.device)
        return X + column * P

    def evaluate(self, X: Any, rows: np.ndarray, D: Any = None
                 ) -> tuple[np.ndarray, Any, np.ndarray]:
        """(f (B,) and ∇fᵀd (B,) on the host, ∇f (B, n)) for the samples in the host mask
        ``rows``, in one host transfer; d is the row of ``D`` (∇f itself when None).
        Entries of the other samples may hold anything: with ``rows_value_and_grad`` they
        are not evaluated (f = ∇fᵀd = 0, ∇f = 0), and the row indices go to the device
        when they are not all of them."""
        self.evaluations += 1
        self.sample_evaluations += rows
        if self.rows_value_and_grad is None:
            return self._values_and_dots(*self.value_and_grad(X), D)
        xp, bsz, index = self.xp, self.bsz, rows.nonzero()[0]
        if len(index) == bsz:
            return self._values_and_dots(*self.rows_value_and_grad(X, index), D)
        pick = xp.asarray(index, dtype=xp.int64, device=self.device)
        Fr, Gr = self.rows_value_and_grad(xp.take(X, pick, axis=0), index)
        fr, Gr, dr = self._values_and_dots(Fr, Gr, None if D is None else xp.take(D, pick, axis=0))
        F, dots = np.zeros(bsz), np.zeros(bsz)
        F[index], dots[index] = fr, dr
        return F, scatter_rows(Gr, index, bsz), dots

    def _values_and_dots(self, F: Any, G: Any, D: Any) -> tuple[np.ndarray, Any, np.ndarray]:
        """(f, ∇f, ∇fᵀd), f and ∇fᵀd (d: rows of D, or of ∇f) on the host in one transfer."""
        xp = self.xp
        F = F if F.dtype == G.dtype else xp.astype(F, G.dtype)
        both = self.host(xp.concat([F, rowdot(xp, G, G if D is None else D)])).reshape(2, -1)
        return both[0], G, both[1]


def take_rows(rows: list[int], *arrays: Any) -> tuple[Any, ...]:
    """The rows ``rows`` (sorted host indices) of each of ``arrays`` (B, ...)."""
    if len(rows) == arrays[0].shape[0]:
        return arrays
    xp, device = array_api_compat.array_namespace(arrays[0]), array_api_compat.device(arrays[0])
    pick = xp.asarray(rows, dtype=xp.int64, device=device)
    return tuple(xp.take(A, pick, axis=0) for A in arrays)


def scatter_rows(R: Any, rows: np.ndarray | list[int], bsz: int) -> Any:
    """The (B, n) array whose rows ``rows`` (host indices) are the rows of R (r, n) and
    whose other rows are zero: a gather, row i taken from row where[i] of [R; 0]."""
    xp, device = array_api_compat.array_namespace(R), array_api_compat.device(R)
    if len(rows) == bsz:
        return R
    where = np.full(bsz, len(rows))
    where[rows] = np.arange(len(rows))
    padded = xp.concat([R, xp.zeros((1, R.shape[1]), dtype=R.dtype, device=device)])
    return xp.take(padded, xp.asarray(where, dtype=xp.int64, device=device), axis=0)


def _on_row_zero(xp: Any, value_and_grad: ValueAndGrad) -> ValueAndGrad:
    """A single-sample x ↦ (f, ∇f) as a B = 1 evaluation X (1, n) ↦ ((1,), (1, n))."""

    def on_rows(X: Any) -> tuple[Any, Any]:
        f, g = value_and_grad(X[0, :])
        if not array_api_compat.is_array_api_obj(f):  # a Python number
            f = xp.asarray(f, dtype=g.dtype, device=array_api_compat.device(g))
        return f[None], g[None, :]

    return on_rows
