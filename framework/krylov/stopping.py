"""Stopping rules for Krylov solves.

A rule is called once before the first iteration and after every iteration with an
:class:`IterationState`; it returns ``True`` to stop.  A rule that sets
``needs_residual = True`` receives the residual vector, which the solver then keeps by
recurrence (no extra operator applications).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from array_api_compat import array_namespace

from framework.krylov.dense import gsvd, orthonormal_coordinates, symmetrize


@dataclass(frozen=True)
class IterationState:
    """What a stopping rule sees: iteration count, residual-norm estimate (host float),
    ‖b‖, and the residual vector when the rule asked for it."""

    iteration: int
    residual_norm: float
    b_norm: float
    residual: Any = None


@runtime_checkable
class StopRule(Protocol):
    needs_residual: bool

    def __call__(self, state: IterationState) -> bool: ...


def check_tolerances(rtol: float, atol: float) -> None:
    """Raise ``ValueError`` naming the argument when a tolerance is negative or not finite."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_reachable(rtol: float, atol: float, dtype_eps: float) -> None:
    """Raise ``ValueError`` for a relative tolerance no iterate can reach in this dtype
    (0 < rtol < eps with atol = 0); rtol = 0 (run to maxiter) stays allowed."""
    if atol == 0 and 0 < rtol < dtype_eps:
        raise ValueError(
            f"rtol={rtol!r} is below the machine epsilon {dtype_eps:.2g} of the data's dtype "
            "and cannot be reached; use a larger rtol, an atol, or rtol=0 to run to maxiter"
        )


@dataclass(frozen=True)
class ResidualRule:
    """Stop when ‖r_k‖ ≤ max(rtol·‖b‖, atol) (the residual norm is the MINRES estimate)."""

    rtol: float = 1e-5
    atol: float = 0.0
    needs_residual: bool = False

    def __post_init__(self) -> None:
        check_tolerances(self.rtol, self.atol)

    def threshold(self, b_norm: float) -> float:
        return max(self.rtol * b_norm, self.atol)

    def __call__(self, state: IterationState) -> bool:
        return state.residual_norm <= self.threshold(state.b_norm)


@dataclass(frozen=True)
class HypergradientErrorEstimator:
    """The Galerkin estimate of the hypergradient error from a recycle space (U, C = HU):

        Jᵀ(w_k − w*) = −JᵀH⁻¹r_k ≈ −JᵀU (UᵀHU)⁻¹ Uᵀ r_k,

    and with the GSVD JᵀU S = U_J diag(c) X⁻¹…, SᵀUᵀHUS = V_H diag(s) …,
    ‖JᵀU(UᵀHU)⁻¹Uᵀr‖ = ‖M r‖ with M = diag(σ)[sel] V_H[:, sel]ᵀ Sᵀ Uᵀ, σ = c/s.
    ``M`` is (sel × n); ``sigma`` the generalised singular values kept.
    """

    M: Any
    sigma: Any
    zero_block: bool = False

    def estimate(self, r: Any) -> float:
        v = self.M @ r
        return math.sqrt(float(v @ v))

    @classmethod
    def from_space(
        cls, U: Any, C: Any, JU: Any, *, keep: int | None = None, rank_tol: float = 1e-12
    ) -> HypergradientErrorEstimator:
        """Build M from U, C = HU and JᵀU (p × k); ``keep`` largest σ (all by default)."""
        xp = array_namespace(U, C, JU)
        Ut = xp.matrix_transpose(U)
        S = orthonormal_coordinates(Ut @ U, rank_tol)
        St = xp.matrix_transpose(S)
        dec = gsvd(JU @ S, symmetrize(St @ (Ut @ C) @ S))
        sel = dec.sigma.shape[0] if keep is None else min(keep, dec.sigma.shape[0])
        scaled = xp.matrix_transpose(dec.left[:, :sel]) * dec.sigma[:sel, None]
        zero = not bool(xp.any(JU != 0))
        return cls(M=(scaled @ St) @ Ut, sigma=dec.sigma[:sel], zero_block=zero)


@dataclass(frozen=True)
class StopConfig:
    """Which stopping rule a recycled solve uses.

    ``kind="residual"``: ‖r‖ ≤ max(rtol·‖b‖, atol).  ``kind="hypergradient"``: the NSC
    ``HypergradientErrorRule`` with relative tolerance ``hg_rtol`` (defaults to rtol),
    ``safety`` factor and ``keep`` generalised singular values (all when None).
    """

    kind: str = "residual"
    rtol: float = 1e-5
    atol: float = 0.0
    hg_rtol: float | None = None
    safety: float = 1.0
    keep: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("residual", "hypergradient"):
            raise ValueError(f"stop kind must be 'residual' or 'hypergradient', got {self.kind!r}")
        check_tolerances(self.rtol, self.atol)
        if self.hg_rtol is not None:
            check_tolerances(self.hg_rtol, 0.0)


class HypergradientErrorRule:
    """Stop when safety·‖M r_k‖ ≤ max(rtol·‖M b‖, atol) (the new stopping criterion, NSC).

    ‖M b‖ is the same Galerkin estimate of the hypergradient norm itself, so ``rtol`` is a
    relative hypergradient error.  When the estimator is identically zero (JᵀU = 0, no
    recycle space yet) the rule falls back to ``fallback`` and says so in ``reason``.
    ``estimates`` records safety·‖M r_k‖ / ‖M b‖ — the estimated *relative* hypergradient
    error — at every check (iteration 0 first).
    """

    needs_residual = True

    def __init__(
        self,
        estimator: HypergradientErrorEstimator | None,
        b: Any,
        *,
        rtol: float = 1e-3,
        atol: float = 0.0,
        safety: float = 1.0,
        fallback: ResidualRule | None = None,
    ) -> None:
        check_tolerances(rtol, atol)
        if not (math.isfinite(safety) and safety > 0):
            raise ValueError(f"safety must be a finite number > 0, got {safety!r}")
        self.estimator, self.safety = estimator, safety
        self.fallback = fallback if fallback is not None else ResidualRule(rtol, atol)
        self.estimates: list[float] = []
        self.reason = ""
        scale = estimator.estimate(b) if estimator is not None else 0.0
        if estimator is None:
            self.reason = "no recycle space yet: residual rule used"
        elif estimator.zero_block or not scale > 0.0:
            self.reason = "JᵀU (UᵀHU)⁻¹Uᵀ b is zero (kept block is zero): residual rule used"
        self.scale = scale
        self.threshold = max(rtol * scale, atol)

    @property
    def active(self) -> bool:
        """False when the rule fell back to the residual rule."""
        return not self.reason

    def __call__(self, state: IterationState) -> bool:
        if not self.active:
            return self.fallback(state)
        est = self.safety * self.estimator.estimate(state.residual)
        self.estimates.append(est / self.scale)
        return est <= self.threshold
