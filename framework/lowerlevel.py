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
from collections.abc import Callable, Generator
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


_Point = tuple[float, float, float]  # (α, f(x + αp), ∇f(x + αp)ᵀp)
WolfeSearch = Generator[tuple[bool, float], tuple[float, float], tuple[str | None, bool]]


def _interpolate(lo: _Point, hi: _Point) -> float:
    """Minimiser of the quadratic through (lo.f, lo.slope, hi.f), kept inside the middle 80 %."""
    delta = hi[0] - lo[0]
    left, right = sorted((lo[0] + 0.1 * delta, lo[0] + 0.9 * delta))
    if math.isfinite(hi[1]):
        curvature = (hi[1] - lo[1] - lo[2] * delta) / (delta * delta)
        if curvature > 0:
            alpha = lo[0] - lo[2] / (2.0 * curvature)
            if left <= alpha <= right:
                return alpha
    return lo[0] + 0.5 * delta


def strong_wolfe_search(
    f0: float, slope0: float, alpha: float, c1: float, c2: float, max_trials: int
) -> WolfeSearch:
    """The strong-Wolfe line search of one sample as a coroutine, so that ``lbfgs`` and
    ``lbfgs_batched`` (which advances B of them together) share every decision.

    Yields (keep the trial just evaluated?, next α) and receives (f, slope) at that α.
    Returns ("last" | "kept" | None, curvature holds): accept the last trial, the most
    recently kept one, or none.
    """

    def armijo(t: _Point) -> bool:
        return math.isfinite(t[1]) and t[1] <= f0 + c1 * t[0] * slope0

    def curvature(t: _Point) -> bool:
        return abs(t[2]) <= -c2 * slope0

    def zoom(lo: _Point, hi: _Point, budget: int, lo_is_last: bool) -> WolfeSearch:
        keep = lo_is_last
        for _ in range(budget):
            a = _interpolate(lo, hi)
            f, s = yield keep, a
            keep, lo_is_last = False, False
            t = (a, f, s)
            if not armijo(t) or t[1] > lo[1]:
                hi = t
                continue
            if curvature(t):
                return "last", True
            if t[2] * (hi[0] - lo[0]) >= 0:
                hi = lo
            lo = t
            keep, lo_is_last = True, True
            if abs(hi[0] - lo[0]) <= 1e-16 * max(1.0, lo[0]):
                break
        if lo[0] > 0 and lo[1] < f0:
            return ("last" if lo_is_last else "kept"), False
        return None, False

    prev = (0.0, f0, slope0)
    keep = False
    for i in range(max_trials):
        f, s = yield keep, alpha
        keep = False
        t = (alpha, f, s)
        if not armijo(t) or (i > 0 and t[1] > prev[1]):
            return (yield from zoom(prev, t, max_trials - i - 1, False))
        if curvature(t):
            return "last", True
        if t[2] >= 0:
            return (yield from zoom(t, prev, max_trials - i - 1, True))
        prev = t
        keep = True
        alpha *= 2.0
    return ("last", False) if prev[0] > 0 and prev[1] < f0 else (None, False)


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
    """Drive ``strong_wolfe_search`` on one sample: (accepted trial or None, whether the
    curvature condition holds)."""
    search = strong_wolfe_search(f0, slope0, alpha, c1, c2, max_trials)
    _, a = next(search)
    kept = None
    while True:
        xa = x + a * p
        fa, ga = ev(xa)
        t = _Trial(a, xa, fa, ga, ev.dot(ga, p) if math.isfinite(fa) else math.nan)
        try:
            keep, a = search.send((t.f, t.slope))
        except StopIteration as stop:
            outcome, holds = stop.value
            return (t if outcome == "last" else kept if outcome == "kept" else None), holds
        if keep:
            kept = t


def check_lbfgs_options(*, c1: float, c2: float, memory: int, maxiter: int) -> None:
    """The checks ``lbfgs`` and ``lbfgs_batched`` make of their options."""
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"need 0 < c1 < c2 < 1; got c1={c1!r}, c2={c2!r}")
    if memory < 1:
        raise ValueError(f"memory must be positive; got memory={memory!r}")
    if maxiter < 0:
        raise ValueError(f"maxiter must be non-negative; got maxiter={maxiter!r}")


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
    check_lbfgs_options(c1=c1, c2=c2, memory=memory, maxiter=maxiter)
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
