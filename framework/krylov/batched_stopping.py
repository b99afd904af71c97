"""The hypergradient-error stopping rule (NSC) for the batched solver.

Per sample i, as ``framework.krylov.stopping.HypergradientErrorRule``:
‖M_i r‖ with M_i = diag(σ) V_Hᵀ Sᵀ U_iᵀ from the GSVD of (JᵀU_i S, SᵀU_iᵀC_iS), stop when
safety·‖M_i r_k‖ ≤ max(rtol·‖M_i b_i‖, atol).  Samples whose estimator is zero (no
recycle vectors yet, JᵀU_i = 0) use the residual rule instead, as the unbatched rule
does.  All (B, ·) arrays stay on the device; estimates are kept per iteration.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from framework.krylov.batched_selection import _coords, _diag, _gsvd_batched, _sym
from framework.krylov.stopping import check_tolerances


class BatchedHypergradientRule:
    """Batched NSC: ``converged(rnorm, residual)`` → (B,) mask; needs the residual."""

    needs_residual = True

    def __init__(
        self,
        U: Any,
        C: Any,
        JU: Any,
        b: Any,
        *,
        rtol: float = 1e-3,
        atol: float = 0.0,
        safety: float = 1.0,
        residual_rtol: float = 1e-3,
        residual_atol: float = 0.0,
        rank_tol: float = 1e-12,
    ) -> None:
        check_tolerances(rtol, atol)
        check_tolerances(residual_rtol, residual_atol)
        xp = array_namespace(U, C, JU, b)
        Ut = xp.matrix_transpose(U)
        S, keep = _coords(xp, Ut @ U, rank_tol)
        St = xp.matrix_transpose(S)
        dead = ~keep
        Gt = _sym(xp, St @ _sym(xp, Ut @ C) @ S)
        sigma, left, _ = _gsvd_batched(xp, JU @ S, Gt + _diag(xp, xp.astype(dead, Gt.dtype)))
        # rows of M: σ_j v_jᵀ Sᵀ Uᵀ (dead directions have σ = 0 and contribute nothing)
        self.M = (xp.matrix_transpose(left) * sigma[..., None]) @ St @ Ut  # (B, k, n)
        self.scale = self._norm(xp, b)
        nonzero = xp.any(xp.reshape(JU != 0, (JU.shape[0], -1)), axis=1)
        self.active = nonzero & (self.scale > 0)
        self.threshold = xp.maximum(rtol * self.scale, xp.full_like(self.scale, atol))
        b_norm = xp.sqrt(xp.sum(b * b, axis=1))
        self.fallback = xp.maximum(residual_rtol * b_norm, xp.full_like(b_norm, residual_atol))
        self.safety = safety
        self.estimates: list[Any] = []
        self.xp = xp

    def _norm(self, xp: Any, r: Any) -> Any:
        v = (self.M @ r[..., None])[..., 0]
        return xp.sqrt(xp.sum(v * v, axis=1))

    def converged(self, rnorm: Any, residual: Any) -> Any:
        xp = self.xp
        est = self.safety * self._norm(xp, residual)
        scale = xp.where(self.scale > 0, self.scale, xp.ones_like(self.scale))
        self.estimates.append(est / scale)
        return xp.where(self.active, est <= self.threshold, rnorm <= self.fallback)
