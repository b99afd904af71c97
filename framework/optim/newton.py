"""Inexact Newton–Krylov for B independent problems min_x f_i(x) advanced together.

Shapes and stopping as in ``lbfgs``.  The inner solve is injected: ``solve(X, G, eta,
rows)`` → (P, hvp) gives, for the samples in the host mask ``rows``, steps p_i with
‖H_i p_i + g_i‖ ≤ η_i‖g_i‖ (H_i = ∇²f_i(x_i); other rows zero) and each sample's
Hessian-vector products (host ints (B,)); for a 1-D x0, ``solve(x, g, eta)`` → (p, hvp).
MINRES suits it: it needs no definiteness.  Iteration k of sample i:

1. forcing term η_i: Eisenstat–Walker choice 2 (``"eisenstat_walker"``), η_k = 0.9
   (‖g_k‖/‖g_{k−1}‖)², raised to 0.9 η_{k−1}² when that exceeds 0.1, η₀ = ``eta_first``
   (default η_max; near the solution 1e-2 saves Newton iterations); or η_k = √‖g_k‖
   (``"sqrt"``); capped at η_max, never below 0.5·tol_i/‖g_k‖ or ``ETA_MIN``;
2. p_i only when ∇f_iᵀp_i < 0, else steepest descent −g_i, first step min(1, 1/‖g_i‖);
3. backtracking α ← α/2 from α = 1 accepts Armijo's f(x + αp) ≤ f(x) + c1 α ∇fᵀp or,
   once f no longer changes in floating point, f(x + αp) ≤ f(x) with a smaller ‖∇f‖.  A
   Newton direction without such a trial in ``max_backtracks`` halvings is replaced by
   −g_i once; when that fails too, the sample stops (LINESEARCH_FAILED).

A sample's arithmetic does not depend on B when the solve's rows do not.  Host transfers
(``host_reads``): one per evaluation round (f and ‖∇f‖²) and one per iteration (∇fᵀp);
the solve's own are the caller's to count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backends.choice import Choice
from backends.kernels import rowdot
from framework.optim.lbfgs import steepest_descent
from framework.optim.outcome import MinimizeResult, MinimizeStatus, SampleLog, require
from framework.optim.rows import RowEvaluator, RowsValueAndGrad, ValueAndGrad, choose

Forcing = Choice("Forcing", "eisenstat_walker sqrt")
LinearSolve = Callable[..., tuple[Any, Any]]
ETA_MAX = 0.5  # largest forcing term (default), and η₀ from a cold start
ETA_MIN = 1e-12  # smallest forcing term: MINRES's recurrence residual stays reliable above


def forcing_terms(kind: Forcing, gnorm: np.ndarray, prev_gnorm: np.ndarray | None,
                  prev_eta: np.ndarray, tol: np.ndarray, eta_max: float) -> np.ndarray:
    """The relative residuals η (B,) the inner solves must reach (see the module doc;
    ``prev_eta`` is η₀ before the first iteration)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == Forcing.sqrt:
            eta = np.sqrt(gnorm)
        elif prev_gnorm is None:
            eta = prev_eta
        else:
            eta = 0.9 * (gnorm / prev_gnorm) ** 2
            safeguard = 0.9 * prev_eta**2
            eta = np.where(safeguard > 0.1, np.maximum(eta, safeguard), eta)
        eta = np.minimum(eta_max, np.maximum(eta, 0.5 * tol / gnorm))
    return np.maximum(np.nan_to_num(eta, nan=eta_max), ETA_MIN)


def newton_krylov(
    fun: Callable[[Any], Any], grad: Callable[[Any], Any], x0: Any, solve: LinearSolve, *,
    gtol: float = 1e-8, rtol: float = 0.0, maxiter: int = 100,
    forcing: str = Forcing.eisenstat_walker, eta_max: float = ETA_MAX,
    eta_first: float | Sequence[float] | None = None, c1: float = 1e-4,
    max_backtracks: int = 30, value_and_grad: ValueAndGrad | None = None,
    rows_value_and_grad: RowsValueAndGrad | None = None,
) -> MinimizeResult:
    """Minimise ``fun`` from ``x0`` ((n,) or (B, n)) by inexact Newton steps from ``solve``
    (``eta_first``: η₀, a float or one per sample; the rest as in ``lbfgs``)."""
    forcing = Forcing(forcing)
    require(0 < c1 < 1 and 0 < eta_max < 1, "0 < c1, eta_max < 1", c1=c1, eta_max=eta_max)
    first = np.asarray(eta_max if eta_first is None else eta_first, dtype=np.float64)
    require(bool(np.all((first > 0) & (first <= eta_max))), "0 < eta_first <= eta_max",
            eta_first=eta_first)
    require(maxiter >= 0 and max_backtracks >= 1, "maxiter >= 0 and max_backtracks >= 1",
            maxiter=maxiter, max_backtracks=max_backtracks)
    ev = RowEvaluator(x0, fun, grad, value_and_grad=value_and_grad,
                      rows_value_and_grad=rows_value_and_grad)
    X, xp, bsz = ev.X0, ev.xp, ev.bsz
    F, G, gg = ev.evaluate(X, np.ones(bsz, dtype=bool))
    gnorm = np.sqrt(gg)
    log = SampleLog(F, gnorm, gtol, rtol)
    hvp = np.zeros(bsz, dtype=np.int64)
    eta, prev_gnorm = np.broadcast_to(first, (bsz,)).copy(), None
    for k, iterating in log.iterate(maxiter):
        eta = forcing_terms(forcing, gnorm, prev_gnorm, eta, log.tol, eta_max)
        if ev.single:  # a single-sample solve (x, g, η) → (p, hvp)
            p, count = solve(X[0, :], G[0, :], float(eta[0]))
            P, counts = p[None, :], [count]
        else:
            P, counts = solve(X, G, eta, iterating)
        hvp += np.where(iterating, np.asarray(counts, dtype=np.int64), 0)
        slope = ev.host(rowdot(xp, G, P))
        newton = iterating & (slope < 0)
        P, slope, alpha = steepest_descent(ev, iterating & ~newton, G, gnorm, P, slope,
                                            np.ones(bsz))
        ok, Xn, Gn, Fn, gn = _backtrack(ev, X, G, F, gnorm, P, slope, alpha, newton, iterating,
                                        c1, max_backtracks)
        log.stop(iterating & ~ok, MinimizeStatus.LINESEARCH_FAILED, k,
                 "backtracking found no step that lowers f at iteration {k} "
                 "(‖∇f‖ = {g:.3e}, tolerance {tol:.3e})")
        prev_gnorm = gnorm
        X, G = ev.select(ok, Xn, X), ev.select(ok, Gn, G)
        F, gnorm = log.record(ok, Fn, gn)
    return log.result(maxiter, X, ev, hvp)


def _backtrack(
    ev: RowEvaluator, X: Any, G: Any, F: np.ndarray, gnorm: np.ndarray, P: Any,
    slope: np.ndarray, alpha: np.ndarray, newton: np.ndarray, searching: np.ndarray,
    c1: float, max_backtracks: int,
) -> tuple[np.ndarray, Any, Any, np.ndarray, np.ndarray]:
    """Backtracking of the rows ``searching`` together, one evaluation of the pending rows
    per round: (accepted, X, ∇f, f, ‖∇f‖), the others' rows unchanged."""
    accepted = np.zeros(len(F), dtype=bool)
    trials = np.zeros(len(F), dtype=np.int64)
    Xa, Ga, Fa, gna = X, G, F.copy(), gnorm.copy()
    pending, newton = searching.copy(), newton.copy()
    while np.count_nonzero(pending):
        Xt = ev.step(X, choose(pending, alpha, np.zeros(len(F))).tolist(), P)
        Ft, Gt, ggt = ev.evaluate(Xt, pending)
        gnt = np.sqrt(ggt)
        with np.errstate(invalid="ignore"):
            take = pending & ((Ft <= F + c1 * alpha * slope) | ((Ft <= F) & (gnt < gnorm)))
        if np.count_nonzero(take):
            Xa, Ga = ev.select(take, Xt, Xa), ev.select(take, Gt, Ga)
            Fa, gna = choose(take, Ft, Fa), choose(take, gnt, gna)
            accepted |= take
            pending &= ~take
        trials += pending
        alpha = choose(pending, 0.5 * alpha, alpha)
        exhausted = pending & (trials >= max_backtracks)
        retry = exhausted & newton  # a Newton direction failed: steepest descent once
        P, slope, alpha = steepest_descent(ev, retry, G, gnorm, P, slope, alpha)
        trials[retry], newton[retry] = 0, False
        pending &= ~(exhausted & ~retry)
    return accepted, Xa, Ga, Fa, gna
