"""L-BFGS for the lower-level problem min_x f(x, θ), written against the array API.

The line search enforces the strong Wolfe conditions (Nocedal & Wright, Algorithms 3.5
and 3.6: bracketing, then a safeguarded quadratic-interpolation zoom) with

    sufficient decrease  f(x + αp) ≤ f(x) + c1 α ∇f(x)ᵀp   (c1 = 1e-4, ∇fᵀp < 0),
    curvature            |∇f(x + αp)ᵀp| ≤ c2 |∇f(x)ᵀp|     (c2 = 0.9).

A trial step that fails sufficient decrease is never accepted, so f never increases.  If
the zoom runs out of trials after finding a step with sufficient decrease but without the
curvature condition, that step is taken if it strictly lowers f (the memory update is
skipped when sᵀy ≤ 0).  A trial whose computed f equals f(x) (round-off level) counts as
sufficient decrease only together with the curvature condition; this lets the solve reach
tight gradient tolerances where f no longer changes in floating point.
If no step gives sufficient decrease the memory is dropped and steepest descent is tried
once; a second failure ends the run with ``LowerLevelStatus.LINESEARCH_FAILED``.
Scalars (f, inner products) come to the host: the line search decides on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import array_api_compat


class LowerLevelStatus(Enum):
    """Why ``lbfgs`` stopped."""

    CONVERGED = "converged"
    MAXITER = "maxiter"
    LINESEARCH_FAILED = "linesearch_failed"
    NONFINITE = "nonfinite"


@dataclass(frozen=True)
class LowerLevelResult:
    """Outcome of one lower-level solve; ``f_history`` holds f at every accepted iterate."""

    x: Any
    converged: bool
    status: LowerLevelStatus
    message: str
    iterations: int
    f_evals: int
    grad_evals: int
    grad_norm: float
    f: float
    f_history: tuple[float, ...]


@dataclass
class _Trial:
    alpha: float
    x: Any
    f: float
    g: Any
    slope: float  # ∇f(x + αp)ᵀp


class _Evaluator:
    """Counts calls of ``fun`` and ``grad`` and keeps scalars on the host."""

    def __init__(
        self,
        fun: Callable[[Any], Any],
        grad: Callable[[Any], Any],
        xp: Any,
        value_and_grad: Callable[[Any], tuple[Any, Any]] | None = None,
    ) -> None:
        self.fun, self.grad, self.xp = fun, grad, xp
        self.value_and_grad = value_and_grad
        self.f_evals = 0
        self.grad_evals = 0

    def __call__(self, x: Any) -> tuple[float, Any]:
        self.f_evals += 1
        self.grad_evals += 1
        if self.value_and_grad is not None:
            f, g = self.value_and_grad(x)
            return float(f), g
        return float(self.fun(x)), self.grad(x)

    def dot(self, a: Any, b: Any) -> float:
        return float(self.xp.linalg.vecdot(a, b))


def _interpolate(lo: _Trial, hi: _Trial) -> float:
    """Minimiser of the quadratic through (lo.f, lo.slope, hi.f), kept inside the middle 80 %."""
    delta = hi.alpha - lo.alpha
    left, right = sorted((lo.alpha + 0.1 * delta, lo.alpha + 0.9 * delta))
    if math.isfinite(hi.f):
        curvature = (hi.f - lo.f - lo.slope * delta) / (delta * delta)
        if curvature > 0:
            alpha = lo.alpha - lo.slope / (2.0 * curvature)
            if left <= alpha <= right:
                return alpha
    return lo.alpha + 0.5 * delta


def _strong_wolfe(
    ev: _Evaluator,
    x: Any,
    f0: float,
    p: Any,
    slope0: float,
    alpha: float,
    *,
    c1: float,
    c2: float,
    max_trials: int,
) -> tuple[_Trial | None, bool]:
    """Return (accepted trial or None, whether the curvature condition holds)."""

    def trial(a: float) -> _Trial:
        xa = x + a * p
        fa, ga = ev(xa)
        slope = ev.dot(ga, p) if math.isfinite(fa) else math.nan
        return _Trial(a, xa, fa, ga, slope)

    def armijo(t: _Trial) -> bool:
        return math.isfinite(t.f) and t.f <= f0 + c1 * t.alpha * slope0

    def curvature(t: _Trial) -> bool:
        return abs(t.slope) <= -c2 * slope0

    def zoom(lo: _Trial, hi: _Trial, budget: int) -> tuple[_Trial | None, bool]:
        for _ in range(budget):
            t = trial(_interpolate(lo, hi))
            if not armijo(t) or t.f > lo.f:
                hi = t
                continue
            if curvature(t):
                return t, True
            if t.slope * (hi.alpha - lo.alpha) >= 0:
                hi = lo
            lo = t
            if abs(hi.alpha - lo.alpha) <= 1e-16 * max(1.0, lo.alpha):
                break
        return (lo, False) if lo.alpha > 0 and lo.f < f0 else (None, False)

    prev = _Trial(0.0, x, f0, None, slope0)
    for i in range(max_trials):
        t = trial(alpha)
        if not armijo(t) or (i > 0 and t.f > prev.f):
            return zoom(prev, t, max_trials - i - 1)
        if curvature(t):
            return t, True
        if t.slope >= 0:
            return zoom(t, prev, max_trials - i - 1)
        prev = t
        alpha *= 2.0
    return (prev, False) if prev.alpha > 0 and prev.f < f0 else (None, False)


def lbfgs(
    fun: Callable[[Any], Any],
    grad: Callable[[Any], Any],
    x0: Any,
    *,
    gtol: float = 1e-8,
    rtol: float = 0.0,
    maxiter: int = 1000,
    memory: int = 10,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_linesearch: int = 40,
    callback: Callable[[int, Any, float, float], None] | None = None,
    value_and_grad: Callable[[Any], tuple[Any, Any]] | None = None,
) -> LowerLevelResult:
    """Minimise ``fun`` from ``x0`` (warm start) with L-BFGS of memory ``memory``.

    Stops when ‖∇f‖ ≤ max(gtol, rtol·‖∇f(x0)‖) (status CONVERGED), after ``maxiter``
    iterations (MAXITER), when the line search fails (LINESEARCH_FAILED) or when f or ∇f
    is not finite at x0 (NONFINITE).  ``callback(k, x, f, grad_norm)`` runs after every
    accepted step.  ``value_and_grad(x)`` → (f, ∇f), when given, replaces the two calls
    (f and ∇f are always needed together; a fused evaluation shares their work).  Arrays
    stay in x0's namespace and on its device.
    """
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"need 0 < c1 < c2 < 1; got c1={c1!r}, c2={c2!r}")
    if memory < 1:
        raise ValueError(f"memory must be positive; got memory={memory!r}")
    if maxiter < 0:
        raise ValueError(f"maxiter must be non-negative; got maxiter={maxiter!r}")
    xp = array_api_compat.array_namespace(x0)
    ev = _Evaluator(fun, grad, xp, value_and_grad)
    x = x0
    f, g = ev(x)
    gnorm = math.sqrt(ev.dot(g, g))
    history = [f]
    tol = max(gtol, rtol * gnorm)
    s_list: list[Any] = []
    y_list: list[Any] = []
    rho_list: list[float] = []

    def finish(status: LowerLevelStatus, message: str, k: int) -> LowerLevelResult:
        return LowerLevelResult(
            x=x,
            converged=status is LowerLevelStatus.CONVERGED,
            status=status,
            message=message,
            iterations=k,
            f_evals=ev.f_evals,
            grad_evals=ev.grad_evals,
            grad_norm=gnorm,
            f=f,
            f_history=tuple(history),
        )

    if not (math.isfinite(f) and math.isfinite(gnorm)):
        return finish(LowerLevelStatus.NONFINITE, f"f or ∇f is not finite at x0 (f={f})", 0)

    for k in range(maxiter):
        if gnorm <= tol:
            return finish(LowerLevelStatus.CONVERGED, f"‖∇f‖ = {gnorm:.3e} ≤ {tol:.3e}", k)
        accepted = None
        for attempt in range(2):
            p = _direction(xp, g, s_list, y_list, rho_list, ev)
            slope = ev.dot(g, p)
            if not slope < 0:  # not a descent direction: restart from steepest descent
                _forget(s_list, y_list, rho_list)
                p, slope = -g, -gnorm * gnorm
            alpha0 = 1.0 if s_list else min(1.0, 1.0 / gnorm)
            accepted, _ = _strong_wolfe(
                ev, x, f, p, slope, alpha0, c1=c1, c2=c2, max_trials=max_linesearch
            )
            if accepted is not None or attempt == 1 or not s_list:
                break
            _forget(s_list, y_list, rho_list)
        if accepted is None:
            return finish(
                LowerLevelStatus.LINESEARCH_FAILED,
                f"line search found no step with sufficient decrease at iteration {k} "
                f"(‖∇f‖ = {gnorm:.3e}, tolerance {tol:.3e})",
                k,
            )
        s = accepted.x - x
        y = accepted.g - g
        sy = ev.dot(s, y)
        if sy > 0:
            s_list.append(s)
            y_list.append(y)
            rho_list.append(1.0 / sy)
            if len(s_list) > memory:
                del s_list[0], y_list[0], rho_list[0]
        x, f, g = accepted.x, accepted.f, accepted.g
        gnorm = math.sqrt(ev.dot(g, g))
        history.append(f)
        if callback is not None:
            callback(k + 1, x, f, gnorm)
    if gnorm <= tol:
        return finish(LowerLevelStatus.CONVERGED, f"‖∇f‖ = {gnorm:.3e} ≤ {tol:.3e}", maxiter)
    return finish(
        LowerLevelStatus.MAXITER,
        f"reached maxiter={maxiter} with ‖∇f‖ = {gnorm:.3e} > {tol:.3e}",
        maxiter,
    )


def _forget(*memories: list[Any]) -> None:
    """Drop the L-BFGS memory (restart from steepest descent)."""
    for memory in memories:
        memory.clear()


def _direction(
    xp: Any, g: Any, s_list: list[Any], y_list: list[Any], rho_list: list[float], ev: _Evaluator
) -> Any:
    """−H_k g by the two-loop recursion, H_0 = (sᵀy / yᵀy) I from the newest pair."""
    q = g
    alphas = []
    for s, y, rho in zip(reversed(s_list), reversed(y_list), reversed(rho_list), strict=True):
        a = rho * ev.dot(s, q)
        alphas.append(a)
        q = q - a * y
    if s_list:
        y = y_list[-1]
        q = (1.0 / (rho_list[-1] * ev.dot(y, y))) * q
    for s, y, rho, a in zip(s_list, y_list, rho_list, reversed(alphas), strict=True):
        b = rho * ev.dot(y, q)
        q = q + (a - b) * s
    return -q
