"""Recycle-space selection for B samples at once, with stacked (B, d, d) dense kernels.

Each sample i owns d_i ≤ D valid columns of its basis W_i (recycle vectors that are not
padding, Lanczos vectors of its own iterations); the rest are masked.  Masked columns are
zeroed, so they span nothing; their directions are then given a value that can never be
chosen (a separated eigenvalue, an identity block) and recognised afterwards by where
their eigenvectors live.  Every step is a stacked ``eigh``/``qr``/``svd``/``solve`` over
the batch — no per-sample Python loop, no host transfer — and each sample gets exactly
what ``framework.krylov.selection.select`` gives it alone (up to rounding): the same
strategies, the same ``which`` conventions, min(k, rank W_i) vectors (zero columns pad
the rest).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from framework.krylov.selection import check_selection


def _t(xp: Any, a: Any) -> Any:
    return xp.matrix_transpose(a)


def _sym(xp: Any, a: Any) -> Any:
    return (a + _t(xp, a)) / 2


def _diag(xp: Any, v: Any) -> Any:
    """(B, D) → (B, D, D) diagonal matrices."""
    eye = xp.eye(v.shape[-1], dtype=v.dtype, device=_device(v))
    return v[..., None] * eye


def _device(a: Any) -> Any:
    return device_of(a)


def _coords(xp: Any, gram: Any, rank_tol: float) -> tuple[Any, Any]:
    """S (B, D, D) with SᵀgramS = I on the kept directions (zero columns elsewhere) and
    the (B, D) mask of kept directions."""
    lam, Q = xp.linalg.eigh(_sym(xp, gram))
    lam_max = xp.max(lam, axis=-1, keepdims=True)
    keep = (lam > rank_tol * lam_max) & (lam_max > 0)
    scale = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, lam, xp.ones_like(lam))), 0.0)
    return Q * scale[:, None, :], keep


def _support(xp: Any, vectors: Any, dead: Any) -> Any:
    """(B, D) mask of the columns of ``vectors`` that live mostly on ``dead`` coordinates."""
    mass = xp.sum(vectors * vectors, axis=-2)
    dead_mass = xp.sum(vectors * vectors * xp.astype(dead, vectors.dtype)[..., None], axis=-2)
    return dead_mass > 0.5 * mass


def _separated(xp: Any, A: Any, dead: Any) -> Any:
    """A with a large multiple of the identity on ``dead`` coordinates (A is zero there):
    their eigenpairs separate from the others and are recognised by their support."""
    big = 1.0 + 2.0 * xp.max(xp.abs(A), axis=(-2, -1), keepdims=True)
    return A + big * _diag(xp, xp.astype(dead, A.dtype))


def _gsvd_batched(xp: Any, A1: Any, A2: Any) -> tuple[Any, Any, Any]:
    """Stacked GSVD (see ``framework.krylov.dense.gsvd``): σ, left V_H, right X⁻ᵀ."""
    p = A1.shape[-2]
    Q, R = xp.linalg.qr(xp.concat([A1, A2], axis=-2))
    Q1, Q2 = Q[:, :p, :], Q[:, p:, :]
    V_H, s, Zt = xp.linalg.svd(Q2)
    Z = _t(xp, Zt)
    c = xp.linalg.vector_norm(Q1 @ Z, axis=-2)
    sigma = c / xp.maximum(s, xp.finfo(s.dtype).smallest_normal)
    return sigma, V_H, xp.linalg.solve(R, Z)


def _normalized(xp: Any, Y: Any) -> Any:
    norms = xp.linalg.vector_norm(Y, axis=-2, keepdims=True)
    return Y / xp.where(norms > 0, norms, xp.ones_like(norms))


def _candidates(
    xp: Any, strategy: str, Gt: Any, Ft: Any, Pt: Any, dead: Any, rank_tol: float
) -> tuple[Any, Any, Any]:
    """Candidate vectors (B, D, D) in S-coordinates, their sort key (small = first) and
    the (B, D) mask of candidates that are padding."""
    if strategy == "ritz":
        theta, Z = xp.linalg.eigh(_separated(xp, Gt, dead))
        return Z, xp.abs(theta), _support(xp, Z, dead)
    if strategy == "harmonic_ritz":
        T, keep = _coords(xp, Ft + _diag(xp, xp.astype(dead, Ft.dtype)), rank_tol)
        A = _t(xp, T) @ Gt @ T
        mu, Uv = xp.linalg.eigh(_sym(xp, _separated(xp, A, ~keep)))
        Z = T @ Uv
        invalid = _support(xp, Z, dead) | _support(xp, Uv, ~keep)
        return Z, -xp.abs(mu), invalid
    side = strategy.removeprefix("rgen_")
    sigma, left, right = _gsvd_batched(xp, Pt, Gt + _diag(xp, xp.astype(dead, Gt.dtype)))
    left, right = _normalized(xp, left), _normalized(xp, right)
    invalid = _support(xp, right, dead)
    if side == "left":
        Y = left
    elif side == "right":
        Y = right
    else:
        agree = xp.sum(left * right, axis=-2)
        signs = xp.sign(agree) + xp.astype(agree == 0, agree.dtype)
        Y = (left + right * signs[:, None, :]) / 2
    return Y, sigma, invalid


def _pick_mask(xp: Any, key: Any, invalid: Any, k: int, which: str) -> tuple[Any, Any]:
    """Rank of every candidate in ascending key order among the valid ones, and the
    (B, D) mask of the chosen ones (exactly min(k, #valid) per sample)."""
    inf = xp.asarray(float("inf"), dtype=key.dtype, device=_device(key))
    keyed = xp.where(invalid, inf, key)
    rank = xp.argsort(xp.argsort(keyed, axis=-1, stable=True), axis=-1, stable=True)
    valid = ~invalid
    count = xp.sum(xp.astype(valid, rank.dtype), axis=-1, keepdims=True)
    from_top = count - 1 - rank
    if which == "small":
        chosen = rank < k
    elif which == "large":
        chosen = from_top < k
    else:
        chosen = (rank < k // 2) | (from_top < k - k // 2)
    return rank, chosen & valid


def select_batched(
    W: Any,
    HW: Any,
    JW: Any,
    valid: Any,
    strategy: str,
    k: int,
    which: str | None = None,
    *,
    rank_tol: float = 1e-12,
) -> Any:
    """The chosen vectors U (B, n, k) of every sample (zero columns where a sample has
    fewer than k): W, HW (B, n, D), JW (B, p, D) or None, ``valid`` (B, D) bool."""
    xp = array_namespace(W, HW)
    coef = selection_coefficients(W, HW, JW, valid, strategy, k, which, rank_tol=rank_tol)
    return (W * xp.astype(valid, W.dtype)[:, None, :]) @ coef


def selection_coefficients(
    W: Any,
    HW: Any,
    JW: Any,
    valid: Any,
    strategy: str,
    k: int,
    which: str | None = None,
    *,
    rank_tol: float = 1e-12,
) -> Any:
    """Coefficients (B, D, k) of the chosen vectors in the masked basis W·diag(valid)."""
    which = check_selection(strategy, k, which)
    if strategy.startswith("rgen") and JW is None:
        raise ValueError(f"strategy {strategy!r} needs JᵀW")
    xp = array_namespace(W, HW)
    m = xp.astype(valid, W.dtype)[:, None, :]
    Wm, HWm = W * m, HW * m
    S, keep = _coords(xp, _t(xp, Wm) @ Wm, rank_tol)
    St = _t(xp, S)
    Gt = _sym(xp, St @ _sym(xp, _t(xp, Wm) @ HWm) @ S)
    Ft = _sym(xp, St @ (_t(xp, HWm) @ HWm) @ S)
    Pt = None if JW is None else (JW * m) @ S
    dead = ~keep
    Y, key, invalid = _candidates(xp, strategy, Gt, Ft, Pt, dead, rank_tol)
    rank, chosen = _pick_mask(xp, key, invalid, k, which)
    big = xp.asarray(Y.shape[-1] + 1, dtype=rank.dtype, device=_device(rank))
    slots = xp.argsort(xp.where(chosen, rank, big), axis=-1, stable=True)[:, :k]
    filled = xp.take_along_axis(chosen, slots, axis=-1)
    D = Y.shape[-1]
    gather = xp.broadcast_to(slots[:, None, :], (Y.shape[0], D, slots.shape[-1]))
    Yk = xp.take_along_axis(Y, gather, axis=-1) * xp.astype(filled, Y.dtype)[:, None, :]
    return S @ Yk
