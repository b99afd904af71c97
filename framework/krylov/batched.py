"""Batched RMINRES: B independent symmetric systems A_i x_i = b_i solved together.

Vectors are rows of (B, n) arrays; the operator ``A`` maps (B, n) → (B, n) (one pass
applies every sample's operator).  Lanczos scalars and Givens rotations are (B,) arrays
on the device, so nothing is copied to the host inside the loop except one boolean
("is any sample still running?") every ``check_every`` iterations.  Convergence is
decided on the device at every iteration, per sample: a sample that satisfies its rule
freezes (its iterate no longer changes) at exactly the iteration where the unbatched
solver would stop, so ``check_every`` changes only how many (harmless, masked) extra
passes run, never the results.

Each sample may carry a recycle space U_i, C_i = A_i U_i (stacked as (B, n, k)); zero
columns are allowed (padding for samples with fewer recycle vectors): they contribute
nothing to the projections.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from backends.host import to_host
from framework.krylov.minres import Status, next_direction
from framework.krylov.stopping import check_reachable, check_tolerances

# status codes on the device (index into STATUS_ORDER)
STATUS_ORDER = (None, Status.CONVERGED, Status.EXACT, Status.MAXITER, Status.BREAKDOWN,
                Status.NONFINITE)
_RUNNING, _CONVERGED, _EXACT, _MAXITER, _BREAKDOWN, _NONFINITE = range(6)


@dataclass(frozen=True)
class BatchedRecycleSpace:
    """Per-sample recycle spaces U, C = A U (each (B, n, k), CᵢᵀCᵢ = I on non-zero
    columns; zero columns are padding)."""

    U: Any
    C: Any

    @property
    def k(self) -> int:
        return int(self.U.shape[2])


@dataclass(frozen=True)
class BatchedKrylovResult:
    """Per-sample outcomes (host tuples) and the batch's work.

    ``iterations``/``matvecs`` per sample count exactly what the unbatched solver would
    have spent; ``passes`` is the number of batched operator calls actually made (each
    applies all B operators, frozen samples included).
    """

    x: Any
    statuses: tuple[Status, ...]
    iterations: tuple[int, ...]
    matvecs: tuple[int, ...]
    residual_norms: tuple[float, ...]
    residual_history: Any
    passes: int
    host_syncs: int
    harvest: Any = None

    @property
    def converged(self) -> tuple[bool, ...]:
        return tuple(s in (Status.CONVERGED, Status.EXACT) for s in self.statuses)


def _rows(xp: Any, a: Any) -> Any:
    """(B,) → (B, 1) for broadcasting against rows."""
    return a[:, None]


def _bmv(M: Any, v: Any) -> Any:
    """Per-sample matrix–vector product: M (B, n, k) @ v (B, k) → (B, n)."""
    return (M @ v[..., None])[..., 0]


def _bmtv(M: Any, v: Any) -> Any:
    """Per-sample Mᵀv: M (B, n, k), v (B, n) → (B, k)."""
    xp = array_namespace(M, v)
    return (xp.matrix_transpose(M) @ v[..., None])[..., 0]


def rminres_batched(
    A: Callable[[Any], Any],
    b: Any,
    *,
    x0: Any = None,
    recycle: BatchedRecycleSpace | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    check_every: int = 1,
    harvest: Any = None,
    stop: Any = None,
) -> BatchedKrylovResult:
    """Solve A_i x_i = b_i for every row i of ``b`` (B, n) by (recycled) MINRES.

    The stopping rule per sample is ‖r_i‖ ≤ max(rtol·‖b_i‖, atol) on the MINRES estimate,
    as in ``rminres``, unless ``stop`` (e.g. ``BatchedHypergradientRule``) is given: its
    ``converged(rnorm, residual)`` returns the (B,) mask, with the residual kept by
    recurrence.  ``harvest`` (a batched harvester) receives the Lanczos data.
    """
    xp = array_namespace(b)
    if b.ndim != 2:
        raise ValueError(f"b must have shape (B, n), got {tuple(b.shape)}")
    B, n = int(b.shape[0]), int(b.shape[1])
    if not bool(xp.all(xp.isfinite(b))):
        raise ValueError("b contains non-finite values (NaN or inf)")
    if x0 is not None:
        if tuple(x0.shape) != (B, n):
            raise ValueError(f"x0 must have shape ({B}, {n}), got {tuple(x0.shape)}")
        if not bool(xp.all(xp.isfinite(x0))):
            raise ValueError("x0 contains non-finite values (NaN or inf)")
    check_tolerances(rtol, atol)
    maxiter = 5 * n if maxiter is None else maxiter
    for name, value in (("maxiter", maxiter), ("check_every", check_every)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    U = C = None
    if recycle is not None:
        U, C = recycle.U, recycle.C
        if U.shape != C.shape or U.ndim != 3 or tuple(U.shape[:2]) != (B, n):
            raise ValueError(
                f"recycle U {tuple(U.shape)} and C {tuple(C.shape)} must be ({B}, {n}, k)"
            )

    dtype = b.dtype
    eps = float(xp.finfo(dtype).eps)
    if stop is None:
        check_reachable(rtol, atol, eps)
    breakdown_tol = 10.0 * eps
    initial = 0
    if x0 is None:
        x = xp.zeros_like(b)
        r = xp.asarray(b, copy=True)
    else:
        x = xp.asarray(x0, copy=True)
        r = b - A(x)
        initial = 1
    passes = initial
    z = None
    if C is not None:
        coef = _bmtv(C, r)
        x = x + _bmv(U, coef)
        r = r - _bmv(C, coef)
        z = xp.zeros_like(coef)

    b_norm = xp.sqrt(xp.sum(b * b, axis=1))
    thresh = xp.maximum(rtol * b_norm, xp.full_like(b_norm, atol))
    beta1 = xp.sqrt(xp.sum(r * r, axis=1))
    residual = r if stop is not None else None
    start_done = beta1 <= thresh if stop is None else stop.converged(beta1, r)
    history = [beta1]
    zeros_b = xp.zeros_like(beta1)
    ones_b = xp.ones_like(beta1)
    status = xp.where(
        start_done,
        xp.where(beta1 > 0, xp.full_like(beta1, _CONVERGED), xp.full_like(beta1, _EXACT)),
        xp.full_like(beta1, _RUNNING),
    )
    live = status == _RUNNING
    iterations = xp.zeros_like(beta1)
    v = r / _rows(xp, xp.where(beta1 > 0, beta1, ones_b))
    if harvest is not None:
        harvest.begin(U, C, v, beta1, live)
    v_prev = d_prev = d_prev2 = e_prev = e_prev2 = None
    beta = beta1
    c_prev = c_prev2 = ones_b
    s_prev = s_prev2 = zeros_b
    phibar = beta1
    anorm = zeros_b
    syncs = 1
    step = 0
    running = bool(xp.any(live))
    while running and step < maxiter:
        step += 1
        p = A(v)
        passes += 1
        bcol = None
        if C is not None:
            bcol = _bmtv(C, p)
            p = p - _bmv(C, bcol)
        if v_prev is not None:
            p = p - _rows(xp, beta) * v_prev
        alpha = xp.sum(v * p, axis=1)
        p = p - _rows(xp, alpha) * v
        if C is not None:
            p = p - _bmv(C, _bmtv(C, p))
        beta_next = xp.sqrt(xp.sum(p * p, axis=1))
        sub = beta if v_prev is not None else zeros_b
        epsilon = s_prev2 * sub
        delta_bar = c_prev2 * sub
        delta = c_prev * delta_bar + s_prev * alpha
        gamma_bar = -s_prev * delta_bar + c_prev * alpha
        gamma = xp.sqrt(gamma_bar * gamma_bar + beta_next * beta_next)
        anorm = xp.where(live, xp.maximum(anorm, xp.abs(alpha) + sub + beta_next), anorm)
        finite = xp.isfinite(alpha) & xp.isfinite(beta_next)
        nonfinite = live & ~finite
        breakdown = live & finite & (gamma <= breakdown_tol * anorm)
        update = live & ~nonfinite & ~breakdown
        gamma_safe = xp.where(update, gamma, ones_b)
        # frozen samples get the identity rotation, so their scalars stay finite
        c = xp.where(update, gamma_bar / gamma_safe, ones_b)
        s = xp.where(update, beta_next / gamma_safe, zeros_b)
        phi = xp.where(update, c * phibar, zeros_b)
        phibar = xp.where(update, -s * phibar, phibar)
        coefs = (_rows(xp, gamma_safe), _rows(xp, delta), _rows(xp, epsilon))
        d = next_direction(v, d_prev, d_prev2, *coefs)
        x = x + xp.where(_rows(xp, update), _rows(xp, phi) * d, 0.0)
        if bcol is not None:
            e = next_direction(bcol, e_prev, e_prev2, *coefs)
            z = z + xp.where(_rows(xp, update), _rows(xp, phi) * e, 0.0)
            e_prev2, e_prev = e_prev, e
        d_prev2, d_prev = d_prev, d
        exact = update & (beta_next <= breakdown_tol * anorm)
        beta_safe = xp.where(finite & (beta_next > 0), beta_next, ones_b)
        v_next = xp.where(_rows(xp, exact), 0.0, p / _rows(xp, beta_safe))
        if harvest is not None:
            harvest.step(alpha, xp.where(exact, zeros_b, beta_next), bcol, v_next, update)
        iterations = iterations + xp.astype(update, dtype)
        rnorm = xp.abs(phibar)
        history.append(rnorm)
        if stop is None:
            converged = update & ~exact & (rnorm <= thresh)
        else:
            fresh = (s * s)[:, None] * residual + (phibar * c)[:, None] * v_next
            residual = xp.where(_rows(xp, update), fresh, residual)
            converged = update & ~exact & stop.converged(rnorm, residual)
        status = xp.where(nonfinite, xp.full_like(status, _NONFINITE), status)
        status = xp.where(breakdown, xp.full_like(status, _BREAKDOWN), status)
        status = xp.where(exact, xp.full_like(status, _EXACT), status)
        status = xp.where(converged, xp.full_like(status, _CONVERGED), status)
        live = update & ~exact & ~converged
        v_prev, v = v, v_next
        beta = beta_next
        c_prev2, c_prev = c_prev, c
        s_prev2, s_prev = s_prev, s
        if step % check_every == 0:
            running = bool(xp.any(live))
            syncs += 1
    status = xp.where(live, xp.full_like(status, _MAXITER), status)
    if z is not None:
        x = x - _bmv(U, z)

    # one transfer of the per-sample summaries to the host at the end
    status_h = np.asarray(to_host(status)).astype(int)
    iters_h = np.asarray(to_host(iterations)).astype(int)
    hist = xp.stack(history, axis=1)
    hist_h = np.asarray(to_host(hist))
    last = [float(hist_h[i, min(iters_h[i], hist_h.shape[1] - 1)]) for i in range(B)]
    # samples that ended by breakdown/non-finite keep the last well-defined estimate
    return BatchedKrylovResult(
        x=x,
        statuses=tuple(STATUS_ORDER[s] for s in status_h),
        iterations=tuple(int(i) for i in iters_h),
        matvecs=tuple(int(i) + initial for i in iters_h),
        residual_norms=tuple(last),
        residual_history=hist_h,
        passes=passes,
        host_syncs=syncs,
        harvest=harvest.finish() if harvest is not None else None,
    )


def residual_norms(xp: Any, A: Callable[[Any], Any], b: Any, x: Any) -> Any:
    """True ‖b_i − A_i x_i‖ per sample (one batched application)."""
    r = b - A(x)
    return xp.sqrt(xp.sum(r * r, axis=1))


__all__ = ["BatchedKrylovResult", "BatchedRecycleSpace", "residual_norms", "rminres_batched"]
