"""Small dense kernels for choosing recycle spaces, on stacked (B, d, d) matrices (or one
d × d matrix), built from the array API ``linalg`` extension's ``eigh``, ``qr``, ``svd``
and ``solve`` (the standard has no generalised ``eigh(a, b)`` or GSVD)."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of


def symmetrize(A: Any) -> Any:
    xp = array_namespace(A)
    return (A + xp.matrix_transpose(A)) / 2


def diag_embed(v: Any) -> Any:
    """(..., d) → (..., d, d) diagonal matrices."""
    xp = array_namespace(v)
    return v[..., None] * xp.eye(v.shape[-1], dtype=v.dtype, device=device_of(v))


def orthonormal_coordinates(gram: Any, rank_tol: float = 1e-12) -> tuple[Any, Any]:
    """S with Sᵀ·gram·S = I on the kept directions and zero columns elsewhere, and the
    (..., d) mask of kept directions: eigenvalues above rank_tol · max (a rank-revealing
    step: W S is an orthonormal basis of range W, plus zero columns)."""
    xp = array_namespace(gram)
    lam, Q = xp.linalg.eigh(symmetrize(gram))
    lam_max = xp.max(lam, axis=-1, keepdims=True)
    keep = (lam > rank_tol * lam_max) & (lam_max > 0)
    scale = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, lam, xp.ones_like(lam))), 0.0)
    return Q * scale[..., None, :], keep


# The generalised SVD of a pair (A1: p × d, A2: d × d) (stacked over leading axes),
#     A1 X⁻ᵀ = U₁ diag(c),   A2 X⁻ᵀ = V_H diag(s),   c² + s² = 1,
# sorted by decreasing σ = c / s; ``left`` = V_H (d × d), ``right`` = X⁻ᵀ (d × d).
GSVD = namedtuple("GSVD", "sigma c s left right")


def gsvd(A1: Any, A2: Any) -> GSVD:
    """GSVD through a QR of the stacked pair, [A1; A2] = [Q1; Q2] R, and an SVD of its lower
    block, Q2 = V_H diag(s) Zᵀ: A2 R⁻¹Z = V_H diag(s), and A1 R⁻¹Z = Q1 Z has orthogonal
    columns of norms c (computed directly, so small c keep their relative accuracy).
    Requires the stacked matrix to have full column rank."""
    xp = array_namespace(A1, A2)
    p = A1.shape[-2]
    Q, R = xp.linalg.qr(xp.concat([A1, A2], axis=-2))
    Q1, Q2 = Q[..., :p, :], Q[..., p:, :]
    V_H, s, Zt = xp.linalg.svd(Q2)
    Z = xp.matrix_transpose(Zt)
    c = xp.linalg.vector_norm(Q1 @ Z, axis=-2)
    sigma = c / xp.maximum(s, xp.finfo(s.dtype).smallest_normal)
    order = xp.argsort(-sigma, axis=-1, stable=True)
    columns = xp.broadcast_to(order[..., None, :], V_H.shape)
    return GSVD(
        sigma=xp.take_along_axis(sigma, order, axis=-1),
        c=xp.take_along_axis(c, order, axis=-1),
        s=xp.take_along_axis(s, order, axis=-1),
        left=xp.take_along_axis(V_H, columns, axis=-1),
        right=xp.take_along_axis(xp.linalg.solve(R, Z), columns, axis=-1),
    )
