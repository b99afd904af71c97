"""Operators as ``rminres`` (like SciPy's ``minres``) takes them: callables, and dense
arrays, sparse matrices and ``LinearOperator``s applied by ``@`` (one (n, n) matrix serves
every row, a (B, n, n) array gives each sample its own); 1-D operators as a batch of one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.host import host_list
from framework.krylov.compaction import Restrictable, restrictable, take

Operator = Callable[[Any], Any]


def is_matrix(A: Any) -> bool:
    """Arrays, sparse matrices and ``LinearOperator``s (which are callable but take
    their vectors as columns) rather than a function of the rows."""
    return hasattr(A, "shape") and (not callable(A) or hasattr(A, "matvec"))


class RowOperator:
    """A 1-D operator (or matrix) as a batch of one: (1, n[, k]) → (1, ·[, k]); checks that
    it preserves the shape unless told not to (Jᵀ maps n-vectors to p-vectors)."""

    def __init__(self, A: Any, *, check: bool = True) -> None:
        self.A, self.check = (lambda v: A @ v) if is_matrix(A) else A, check

    def __call__(self, V: Any) -> Any:
        row = V[0, ...]
        out = self.A(row)
        if self.check and out.shape != row.shape:
            raise ValueError(f"operator returned shape {tuple(out.shape)} for input of shape "
                             f"{tuple(row.shape)}")
        return out[None, ...]


def batch_operator(A: Any) -> Operator:
    """A callable on rows: (B, n) → (B, n) and blocks (B, n, k) → (B, n, k); a matrix
    becomes a ``Restrictable`` (per-sample matrices restrict to their rows, one shared
    matrix to itself)."""
    if not is_matrix(A):
        return A
    if len(A.shape) == 3:  # one matrix per sample
        return Restrictable(lambda V: A @ V if V.ndim == 3 else (A @ V[..., None])[..., 0],
                            lambda rows: batch_operator(take(rows, A)))

    def apply(V: Any) -> Any:
        if V.ndim == 2:
            return (A @ V.T).T  # the block of rows as columns: one product
        xp = array_namespace(V)
        return xp.stack([A @ V[i, ...] for i in range(V.shape[0])])

    shared = Restrictable(apply, lambda rows: shared)
    return shared


def shifted(A: Operator, shift: float) -> Operator:
    """v ↦ A v − σ v (restrictable when A is)."""
    def apply(V: Any) -> Any:
        return A(V) - shift * V

    if not restrictable(A):
        return apply
    return Restrictable(apply, lambda rows: shifted(A.restrict(rows), shift))


def check_symmetric(A: Operator, like: Any, name: str) -> None:
    """SciPy's symmetry test on a pseudo-random vector w per row: with y = A w,
    |yᵀy − wᵀ(A y)| ≤ (yᵀy + ε) ε^{1/3}; ``ValueError`` naming ``name`` otherwise.
    (Two passes of A.)"""
    xp = array_namespace(like)
    index = xp.reshape(xp.arange(like.shape[0] * like.shape[1], dtype=like.dtype,
                                 device=device_of(like)), tuple(like.shape))
    w = xp.sin(index * 12.9898 + 78.233) * 43758.5453
    w = w - xp.floor(w) - 0.5  # a fixed hash of the index, uniform on [−½, ½)
    y = A(w)
    s, t = xp.vecdot(y, y), xp.vecdot(w, A(y))
    eps = float(xp.finfo(like.dtype).eps)
    bad = host_list(xp.abs(s - t) > (s + eps) * eps ** (1.0 / 3.0))
    if any(bad):
        rows = [i for i, b in enumerate(bad) if b]
        raise ValueError(f"{name} is not symmetric (SciPy's check failed for sample(s) "
                         f"{rows}); MINRES needs a symmetric operator — pass check=False "
                         "to skip the test")
