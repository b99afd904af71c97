"""Small dense kernels for choosing recycle spaces (d × d problems, d = dim W).

Everything is reduced to ``eigh``, ``qr``, ``svd`` and ``solve`` from the array API
``linalg`` extension, so the same code runs on NumPy, CuPy and array-api-strict and the
small matrices stay on the device of their inputs.  (The standard has no generalised
``eigh(a, b)`` or GSVD, and CuPy lacks ``eigh(a, b)``: both are built here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace


def symmetrize(A: Any) -> Any:
    xp = array_namespace(A)
    return (A + xp.matrix_transpose(A)) / 2


def orthonormal_coordinates(gram: Any, rank_tol: float = 1e-12) -> Any:
    """S (d × r) with Sᵀ·gram·S = I, dropping directions whose Gram eigenvalue is below
    rank_tol · max (a rank-revealing step: W S is an orthonormal basis of range W)."""
    xp = array_namespace(gram)
    lam, Q = xp.linalg.eigh(symmetrize(gram))
    keep = lam > rank_tol * xp.max(lam)
    idx = xp.nonzero(keep)[0]
    lam_k = xp.take(lam, idx)
    return xp.take(Q, idx, axis=1) / xp.sqrt(lam_k)


def definite_pencil_eig(A: Any, B: Any, rank_tol: float = 1e-12) -> tuple[Any, Any]:
    """Eigenpairs of A z = μ B z for symmetric A and symmetric positive (semi)definite B,
    with Zᵀ B Z = I; directions where B is numerically singular are dropped."""
    xp = array_namespace(A)
    T = orthonormal_coordinates(B, rank_tol)
    mu, Uv = xp.linalg.eigh(symmetrize(xp.matrix_transpose(T) @ A @ T))
    return mu, T @ Uv


@dataclass(frozen=True)
class GSVD:
    """Generalised SVD of a pair (A1: p × d, A2: d × d):

        A1 X⁻ᵀ = U₁ diag(c),   A2 X⁻ᵀ = V_H diag(s),   c² + s² = 1,

    sorted by decreasing σ = c / s.  ``left`` = V_H (d × d), ``right`` = X⁻ᵀ (d × d).
    """

    sigma: Any
    c: Any
    s: Any
    left: Any
    right: Any


def gsvd(A1: Any, A2: Any) -> GSVD:
    """GSVD through a QR of the stacked pair and an SVD of its lower block.

    [A1; A2] = [Q1; Q2] R and Q2 = V_H diag(s) Zᵀ give A2 R⁻¹Z = V_H diag(s) and
    A1 R⁻¹Z = Q1 Z with orthogonal columns of norms c (computed directly, so small c
    keep their relative accuracy).  Requires the stacked matrix to have full column rank.
    """
    xp = array_namespace(A1, A2)
    p = A1.shape[0]
    Q, R = xp.linalg.qr(xp.concat([A1, A2], axis=0))
    Q1, Q2 = Q[:p, :], Q[p:, :]
    V_H, s, Zt = xp.linalg.svd(Q2)
    Z = xp.matrix_transpose(Zt)
    c = xp.linalg.vector_norm(Q1 @ Z, axis=0)
    tiny = xp.finfo(s.dtype).smallest_normal
    sigma = c / xp.maximum(s, tiny)
    order = xp.argsort(-sigma)
    return GSVD(
        sigma=xp.take(sigma, order),
        c=xp.take(c, order),
        s=xp.take(s, order),
        left=xp.take(V_H, order, axis=1),
        right=xp.take(xp.linalg.solve(R, Z), order, axis=1),
    )
