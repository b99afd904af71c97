"""Synthetic sequences of Hessian-like systems for testing and benchmarking recycling.

H_t = L + diag(d_0 + t·|δ|) (2-D Dirichlet Laplacian on a side × side grid plus a
slowly drifting non-negative diagonal), g_t = b_0 + t·ε·e, and a smooth Jᵀ (p sine modes),
mimicking the slowly changing systems of an outer bilevel run.  Operators are written
with array-API operations, so the sequence lives on any backend's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from array_api_compat import array_namespace


@dataclass(frozen=True)
class SyntheticSystem:
    """One system H w = g, its Jᵀ operator and the reference hypergradient −Jᵀw* (or None),
    as ``framework.krylov.sequence.solve_sequence`` reads them."""

    H: Callable[[Any], Any]
    g: Any
    jac_t: Callable[[Any], Any] | None = None
    reference: Any = None


def laplacian_2d(x: Any, side: int) -> Any:
    """Apply the 5-point Dirichlet Laplacian to x of shape (n,) or (n, b), n = side²."""
    xp = array_namespace(x)
    cols = x.shape[1] if x.ndim == 2 else 1
    img = xp.reshape(x, (side, side, cols))
    out = 4.0 * img
    out[1:, :, :] -= img[:-1, :, :]
    out[:-1, :, :] -= img[1:, :, :]
    out[:, 1:, :] -= img[:, :-1, :]
    out[:, :-1, :] -= img[:, 1:, :]
    return xp.reshape(out, x.shape)


@dataclass(frozen=True)
class DriftingSequence:
    """Host data of the sequence; ``systems(backend)`` builds the ``SyntheticSystem``s."""

    side: int
    diagonals: tuple[np.ndarray, ...]
    rhs: tuple[np.ndarray, ...]
    J: np.ndarray

    def reference_hypergradient(self, t: int) -> np.ndarray:
        """−Jᵀ H_t⁻¹ g_t by a sparse direct solve on the host."""
        one = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(self.side, self.side))
        eye = sp.identity(self.side)
        h = (sp.kron(one, eye) + sp.kron(eye, one) + sp.diags(self.diagonals[t])).tocsc()
        return -self.J.T @ spla.spsolve(h, self.rhs[t])

    def systems(self, backend: Any = None, *, with_jacobian: bool = False,
                with_reference: bool = False) -> list[SyntheticSystem]:
        put = (lambda a: a) if backend is None else backend.asarray
        J = put(self.J)

        def hessian(diag: Any) -> Callable[[Any], Any]:
            column = diag[:, None]
            return lambda v: laplacian_2d(v, self.side) + (diag if v.ndim == 1 else column) * v

        def jac_t(w: Any) -> Any:
            return array_namespace(J, w).matrix_transpose(J) @ w

        return [
            SyntheticSystem(
                H=hessian(put(self.diagonals[t])), g=put(self.rhs[t]),
                jac_t=jac_t if with_jacobian else None,
                reference=put(self.reference_hypergradient(t)) if with_reference else None,
            )
            for t in range(len(self.rhs))
        ]


def drifting_sequence(side: int = 64, count: int = 30, *, seed: int = 0) -> DriftingSequence:
    """The sequence of the module docstring, seeded: |δ| ~ 10⁻⁴|N(0, 1)|, ε = 0.05/count, p = 20."""
    rng = np.random.default_rng(seed)
    n = side * side
    d0 = rng.uniform(0.0, 1e-3, n)
    delta = np.abs(rng.standard_normal(n)) * 1e-4
    b0, e = rng.standard_normal(n), rng.standard_normal(n)
    grid = np.linspace(0.0, 1.0, side)
    modes = [(i % 5 + 1, i // 5 + 1) for i in range(20)]
    J = np.stack(
        [np.outer(np.sin(a * np.pi * grid), np.sin(b * np.pi * grid)).ravel() for a, b in modes],
        axis=1,
    )
    return DriftingSequence(
        side=side,
        diagonals=tuple(d0 + t * delta for t in range(count)),
        rhs=tuple(b0 + 0.05 * t / count * e for t in range(count)),
        J=J,
    )
