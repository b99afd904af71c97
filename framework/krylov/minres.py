"""MINRES with an optional recycle space (RMINRES), written once against the array API.

Given a symmetric (possibly indefinite) operator A, right-hand side b and, optionally, a
recycle space (U, C = AU, CᵀC = I), the solver

* projects the start:  x₀ ← x₀ + U Cᵀr₀,  r₀ ← (I − CCᵀ) r₀;
* runs Lanczos on (I − CCᵀ)A: (I − CCᵀ)AV_m = V_{m+1}T̄_m with B_m = CᵀAV_m;
* returns the minimal-residual iterate x_m = x₀ + V_m y − U B_m y with
  y = argmin ‖β₁e₁ − T̄_m y‖, by short recurrences (Givens rotations), so no basis is stored.

Work per iteration: one operator application, two inner products and a few vector
updates.  The Lanczos and Givens scalars live on the host as Python floats: this small
dense step (two scalars per iteration) is the only host transfer inside the loop.  The
batched solver (``framework.krylov.batched``) keeps them on the device instead.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from framework.krylov.lanczos import Harvester
from framework.krylov.recycle_space import RecycleSpace
from framework.krylov.stopping import (
    IterationState,
    ResidualRule,
    StopRule,
    check_reachable,
    check_tolerances,
)


class Status(enum.Enum):
    """Why a solve ended."""

    CONVERGED = "converged"
    EXACT = "exact"
    MAXITER = "maxiter"
    BREAKDOWN = "breakdown"
    NONFINITE = "nonfinite"

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "the stopping rule was satisfied",
    Status.EXACT: "Lanczos found an invariant subspace: the iterate solves the system",
    Status.MAXITER: "reached maxiter before the stopping rule was satisfied",
    Status.BREAKDOWN: "the projected tridiagonal matrix became singular (A is singular "
    "on the Krylov space); the iterate is the last well-defined one",
    Status.NONFINITE: "a non-finite value appeared (the operator returned NaN or inf)",
}


@dataclass(frozen=True)
class KrylovResult:
    """Outcome of one solve.

    ``matvecs`` counts the solver's operator applications (one per iteration, one for
    the initial residual when ``x0`` is given); ``check_matvecs`` counts the separate
    final true-residual check.  ``residual_norm`` is the true ‖b − Ax‖ at exit when
    that check ran (else the recurrence estimate); ``residual_norms`` is the estimate
    history starting at iteration 0.
    """

    x: Any
    converged: bool
    status: Status
    iterations: int
    matvecs: int
    check_matvecs: int
    residual_norm: float
    residual_norms: tuple[float, ...]
    harvest: Any = None

    @property
    def message(self) -> str:
        return self.status.message


def _validate_vector(xp: Any, name: str, v: Any, n: int) -> None:
    if v.ndim != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(v.shape)}")
    if not bool(xp.all(xp.isfinite(v))):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _apply(A: Callable[[Any], Any], v: Any) -> Any:
    out = A(v)
    if out.shape != v.shape:
        raise ValueError(
            f"operator returned shape {tuple(out.shape)} for input of shape {tuple(v.shape)}"
        )
    return out


def next_direction(v: Any, prev: Any, prev2: Any, gamma: Any, delta: Any, epsilon: Any) -> Any:
    """The MINRES direction recurrence d_k = (v_k − δ d_{k−1} − ε d_{k−2}) / γ (absent
    terms skipped); γ, δ, ε are scalars or arrays broadcasting against v.  The same
    recurrence carries the recycle-space coefficients (v_k → b_k = CᵀAv_k)."""
    d = v / gamma
    if prev is not None:
        d = d - (delta / gamma) * prev
    if prev2 is not None:
        d = d - (epsilon / gamma) * prev2
    return d


def rminres(
    A: Callable[[Any], Any],
    b: Any,
    *,
    x0: Any = None,
    recycle: RecycleSpace | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    stop: StopRule | None = None,
    callback: Callable[[Any], None] | None = None,
    harvest: Harvester | None = None,
    true_residual: bool = True,
) -> KrylovResult:
    """Solve A x = b for symmetric A by (recycled) MINRES.

    Parameters
    ----------
    A : callable
        ``A(v)`` returns A·v for v of shape (n,) (C = AU of a recycle space is supplied,
        not recomputed).  Wrap it in ``CountingOperator`` to count applications.
    b : array (n,)
    x0 : array (n,), optional
        Starting guess (zero when omitted, which saves the initial application).
    recycle : RecycleSpace, optional
        U, C with C = A U and CᵀC = I for *this* A.
    rtol, atol : float
        Default rule ‖r‖ ≤ max(rtol·‖b‖, atol); ignored when ``stop`` is given.
    maxiter : int, optional
        Iteration limit (default 5n).
    stop : StopRule, optional
        Custom stopping rule; if it has ``needs_residual``, the residual vector is kept
        by recurrence (no extra operator applications).
    callback : callable, optional
        ``callback(xk)`` after every iteration (forms the iterate: O(nk) extra work with
        a recycle space).
    harvest : Harvester, optional
        Receives the Lanczos data (e.g. ``LanczosRecorder``); ``result.harvest`` holds
        what it returns.
    true_residual : bool
        Compute ‖b − Ax‖ at exit (one application, reported as ``check_matvecs``).
    """
    xp = array_namespace(b)
    if b.ndim != 1:
        raise ValueError(f"b must be a 1-D array of shape (n,), got shape {tuple(b.shape)}")
    n = int(b.shape[0])
    shape = getattr(A, "shape", None)
    if shape is not None and tuple(shape) != (n, n):
        raise ValueError(f"operator shape {tuple(shape)} does not match b of shape ({n},)")
    _validate_vector(xp, "b", b, n)
    if x0 is not None:
        _validate_vector(xp, "x0", x0, n)
    check_tolerances(rtol, atol)
    if maxiter is None:
        maxiter = 5 * n
    if isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral) or maxiter < 1:
        raise ValueError(f"maxiter must be an integer >= 1, got {maxiter!r}")
    maxiter = int(maxiter)
    eps = float(xp.finfo(b.dtype).eps)
    if stop is None:
        check_reachable(rtol, atol, eps)
    breakdown_tol = 10.0 * eps
    rule = stop if stop is not None else ResidualRule(rtol, atol)
    keep_residual = bool(getattr(rule, "needs_residual", False))
    U = C = None
    if recycle is not None:
        U, C = recycle.U, recycle.C
        if U.shape != C.shape or U.ndim != 2 or U.shape[0] != n:
            raise ValueError(
                f"recycle space U {tuple(U.shape)} and C {tuple(C.shape)} must both be ({n}, k)"
            )

    matvecs = 0
    if x0 is None:
        x = xp.zeros_like(b)
        r = xp.asarray(b, copy=True)
    else:
        x = xp.asarray(x0, copy=True)
        r = b - _apply(A, x)
        matvecs += 1
    z = None  # coefficients of −U in the iterate: x = x_V − U z
    if C is not None:
        coef = xp.matrix_transpose(C) @ r
        x = x + U @ coef
        r = r - C @ coef
        z = xp.zeros_like(coef)

    b_norm = math.sqrt(float(b @ b))
    beta1 = math.sqrt(float(r @ r))
    norms = [beta1]
    residual = r if keep_residual else None
    status: Status | None = None
    if not math.isfinite(beta1):
        status = Status.NONFINITE
    elif rule(IterationState(0, beta1, b_norm, residual)):
        status = Status.CONVERGED if beta1 > 0.0 else Status.EXACT

    iterations = 0
    if status is None:
        v = r / beta1
        v_prev = None
        if harvest is not None:
            harvest.begin(U, C, v, beta1)
        # Directions d (for V) and e (for the U-coefficients); two of each are kept.
        d_prev = d_prev2 = None
        e_prev = e_prev2 = None
        beta = beta1  # β_k, the previous sub-diagonal entry (β_1 := ‖r0‖, unused)
        c_prev = c_prev2 = 1.0
        s_prev = s_prev2 = 0.0
        phibar = beta1
        anorm = 0.0  # running estimate of ‖T̄‖, the scale for the breakdown test
        while True:
            iterations += 1
            p = _apply(A, v)
            matvecs += 1
            bcol = None
            if C is not None:
                bcol = xp.matrix_transpose(C) @ p
                p = p - C @ bcol
            if v_prev is not None:
                p = p - beta * v_prev  # not in place: A may return a buffer it owns
            elif C is None:
                p = xp.asarray(p, copy=True)
            alpha = float(v @ p)
            p -= alpha * v
            if C is not None:
                # Second projection: keeps V ⟂ C to working precision (no applications).
                p -= C @ (xp.matrix_transpose(C) @ p)
            beta_next = math.sqrt(float(p @ p))
            # Rotate the new column (β_k, α_k, β_{k+1}) of T̄ by the previous rotations.
            sub = beta if v_prev is not None else 0.0
            epsilon = s_prev2 * sub
            delta_bar = c_prev2 * sub
            delta = c_prev * delta_bar + s_prev * alpha
            gamma_bar = -s_prev * delta_bar + c_prev * alpha
            gamma = math.hypot(gamma_bar, beta_next)
            anorm = max(anorm, abs(alpha) + sub + beta_next)
            if not (math.isfinite(alpha) and math.isfinite(beta_next)):
                status = Status.NONFINITE
                iterations -= 1
                break
            if gamma <= breakdown_tol * anorm:
                # β_{k+1} ≈ 0 and γ̄_k ≈ 0: T_k is singular (A singular on the Krylov
                # space, e.g. an inconsistent singular system); keep the last iterate.
                status = Status.BREAKDOWN
                iterations -= 1
                break
            c, s = gamma_bar / gamma, beta_next / gamma
            phi = c * phibar
            phibar = -s * phibar
            # d_k = (v_k − δ d_{k−1} − ε d_{k−2}) / γ, and the same for the U-part.
            d = next_direction(v, d_prev, d_prev2, gamma, delta, epsilon)
            x += phi * d
            if bcol is not None:
                e = next_direction(bcol, e_prev, e_prev2, gamma, delta, epsilon)
                z += phi * e
                e_prev2, e_prev = e_prev, e
            d_prev2, d_prev = d_prev, d
            exact = beta_next <= breakdown_tol * anorm
            v_next = p / beta_next if not exact else xp.zeros_like(p)
            if harvest is not None:
                harvest.step(alpha, 0.0 if exact else beta_next, bcol, v_next)
            if keep_residual:
                residual = (s * s) * residual + (phibar * c) * v_next
            rnorm = abs(phibar)
            norms.append(rnorm)
            if callback is not None:
                callback(x if z is None else x - U @ z)
            if exact:
                status = Status.EXACT
                break
            if rule(IterationState(iterations, rnorm, b_norm, residual)):
                status = Status.CONVERGED
                break
            if iterations >= maxiter:
                status = Status.MAXITER
                break
            v_prev, v = v, v_next
            beta = beta_next
            c_prev2, c_prev = c_prev, c
            s_prev2, s_prev = s_prev, s

    if z is not None:
        x = x - U @ z
    residual_norm = norms[-1]
    check = 0
    if true_residual and status is not Status.NONFINITE:
        rt = b - _apply(A, x)
        check = 1
        residual_norm = math.sqrt(float(rt @ rt))
    result_harvest = harvest.finish() if harvest is not None else None
    return KrylovResult(
        x=x,
        converged=status in (Status.CONVERGED, Status.EXACT),
        status=status,
        iterations=iterations,
        matvecs=matvecs,
        check_matvecs=check,
        residual_norm=residual_norm,
        residual_norms=tuple(norms),
        harvest=result_harvest,
    )

