"""Counted evaluations of the rows of a batch of iterates, and counted host transfers.

An L-BFGS batch holds B samples' iterates as the rows of X (B, n).  ``RowEvaluator``
evaluates f (B,) and ∇f (B, n) at X, counts the evaluations per sample and per call, and
brings per-sample scalars to the host in one counted transfer per round (a
synchronisation on a GPU).  With a row evaluator (``rows_value_and_grad``) only the rows
of the samples still searching are gathered and evaluated; otherwise every row is
evaluated and the others are ignored.  A single sample (a 1-D x0 promoted to B = 1) is
evaluated by the caller's single-sample functions on row 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from backends.host import to_host

ValueAndGrad = Callable[[Any], tuple[Any, Any]]
RowsValueAndGrad = Callable[[Any, np.ndarray], tuple[Any, Any]]


def rowdot(xp: Any, a: Any, b: Any) -> Any:
    """Row-wise inner products of two (B, n) arrays: (B,).  Each row's arithmetic is
    independent of B and of the BLAS kernel: an elementwise product summed along the row
    (``vecdot`` calls BLAS or its own loop depending on the arrays' strides, whose
    roundings differ on some kernels)."""
    return xp.sum(a * b, axis=-1)


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
    """Evaluations of f and ∇f at the rows of X and the host transfers of an L-BFGS batch.

    ``evaluations`` counts the calls (one per line-search round, plus the one at x0);
    ``sample_evaluations[i]`` the evaluations of sample i; ``host_reads`` the transfers.
    """

    def __init__(
        self,
        X0: Any,
        fun: Callable[[Any], Any],
        grad: Callable[[Any], Any],
        *,
        value_and_grad: ValueAndGrad | None = None,
        rows_value_and_grad: RowsValueAndGrad | None = None,
        single_sample: bool = False,
    ) -> None:
        self.xp = array_api_compat.array_namespace(X0)
        self.device = array_api_compat.device(X0)
        self.bsz = int(X0.shape[0])
        self.rows_value_and_grad = rows_value_and_grad
        if value_and_grad is None:
            def value_and_grad(x: Any) -> tuple[Any, Any]:
                return fun(x), grad(x)
        self.value_and_grad = _on_row_zero(self.xp, value_and_grad) if single_sample \
            else value_and_grad
        self.evaluations = 0
        self.host_reads = 0
        self.sample_evaluations = np.zeros(self.bsz, dtype=np.int64)

    @classmethod
    def at_start(
        cls, x0: Any, fun: Callable[[Any], Any], grad: Callable[[Any], Any], *,
        value_and_grad: ValueAndGrad | None, rows_value_and_grad: RowsValueAndGrad | None,
    ) -> tuple[RowEvaluator, Any, bool]:
        """(evaluator, rows X (B, n), whether x0 was one sample (n,)) for a start x0."""
        if x0.ndim not in (1, 2):
            raise ValueError(f"x0 has shape {tuple(x0.shape)}; expected (n,) or (B, n)")
        single = x0.ndim == 1
        if single and rows_value_and_grad is not None:
            raise ValueError("rows_value_and_grad needs x0 of shape (B, n)")
        X = x0[None, :] if single else x0
        ev = cls(X, fun, grad, value_and_grad=value_and_grad,
                 rows_value_and_grad=rows_value_and_grad, single_sample=single)
        return ev, X, single

    def host(self, a: Any) -> np.ndarray:
        """Small device values to the host as float64: the documented, counted transfer."""
        self.host_reads += 1
        return np.asarray(to_host(a), dtype=np.float64)

    def select(self, mask: np.ndarray, new: Any, old: Any) -> Any:
        """Rows of ``new`` ((B,) or (B, n)) where the host (B,) ``mask`` holds, else rows
        of ``old``; no device work when the mask is all true or all false (always so for
        B = 1)."""
        count = np.count_nonzero(mask)
        if count == self.bsz:
            return new
        if count == 0:
            return old
        rows = mask.reshape(mask.shape + (1,) * (new.ndim - 1))
        return self.xp.where(self.xp.asarray(rows, device=self.device), new, old)

    def select_rows(self, rows: list[int], new: Any, old: Any) -> Any:
        """``select`` for the samples ``rows`` (host indices)."""
        if len(rows) == self.bsz:
            return new
        mask = np.zeros(self.bsz, dtype=bool)
        mask[rows] = True
        return self.select(mask, new, old)

    def step(self, X: Any, alpha: list[float], P: Any) -> Any:
        """X + diag(α) P for the host steps α (B,); a scalar multiply when all are equal
        (the same products)."""
        if min(alpha) == max(alpha):
            return X + alpha[0] * P
        column = self.xp.asarray(np.array(alpha)[:, None], dtype=X.dtype, device=self.device)
        return X + column * P

    def evaluate(
        self, X: Any, rows: np.ndarray, D: Any = None
    ) -> tuple[np.ndarray, Any, np.ndarray]:
        """(f (B,) and ∇fᵀd (B,) on the host, ∇f (B, n)) for the samples in the host mask
        ``rows``, in one host transfer; d is the row of ``D`` (∇f itself when None).
        Entries of the other samples may hold anything."""
        self.evaluations += 1
        self.sample_evaluations += rows
        if self.rows_value_and_grad is not None:
            return self._evaluate_subset(X, rows.nonzero()[0], D)
        F, G = self.value_and_grad(X)
        both = self._values_and_dots(F, G, G if D is None else D)
        return both[0], G, both[1]

    def _values_and_dots(self, F: Any, G: Any, D: Any) -> np.ndarray:
        """(2, r) host array [f; ∇fᵀd]: one transfer."""
        xp = self.xp
        F = F if F.dtype == G.dtype else xp.astype(F, G.dtype)
        both = self.host(xp.concat([F, rowdot(xp, G, D)]))
        return both.reshape(2, -1)

    def _evaluate_subset(
        self, X: Any, rows: np.ndarray, D: Any
    ) -> tuple[np.ndarray, Any, np.ndarray]:
        """Evaluate the samples ``rows`` only; the others get f = ∇fᵀd = 0 and ∇f = 0.
        The row indices go to the device when they are not all of them."""
        xp, bsz = self.xp, self.bsz
        if len(rows) == bsz:
            F, G = self.rows_value_and_grad(X, rows)
            both = self._values_and_dots(F, G, G if D is None else D)
            return both[0], G, both[1]
        index = xp.asarray(rows, dtype=xp.int64, device=self.device)
        Fr, Gr = self.rows_value_and_grad(xp.take(X, index, axis=0), rows)
        both = self._values_and_dots(Fr, Gr, Gr if D is None else xp.take(D, index, axis=0))
        F, dots = np.zeros(bsz), np.zeros(bsz)
        F[rows], dots[rows] = both[0], both[1]
        return F, scatter_rows(Gr, rows, bsz), dots


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
