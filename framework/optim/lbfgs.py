"""L-BFGS for B independent problems min_x f_i(x) advanced together (B = 1 for a 1-D x0).

With x0 of shape (B, n), ``fun(X)`` → (B,) and ``grad(X)`` → (B, n) evaluate all rows at
once; with x0 of shape (n,) they take and return one sample's arrays and the result is
unwrapped.  Every sample has its own memory (``memory``), strong-Wolfe line search
(``line_search``; when it fails, the memory is dropped and steepest descent tried once)
and stopping test; a stopped sample's row no longer changes.  A sample's arithmetic does
not depend on B: B samples together take the iterations and evaluations each takes alone.

Host transfers (``host_reads``): one per evaluation round (f and the slopes ∇fᵀp) and two
per iteration (the new direction's slopes; sᵀy with ‖∇f‖²); the two-loop recursion stays
on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from framework.optim.line_search import search_rows
from framework.optim.memory import LBFGSMemory
from framework.optim.outcome import MinimizeResult, MinimizeStatus, SampleLog, require
from framework.optim.rows import RowEvaluator, RowsValueAndGrad, ValueAndGrad, choose, rowdot


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
    callback: Callable[[int, Any, Any, Any], None] | None = None,
    value_and_grad: ValueAndGrad | None = None,
    rows_value_and_grad: RowsValueAndGrad | None = None,
) -> MinimizeResult:
    """Minimise ``fun`` from ``x0`` ((n,) or (B, n), a warm start) by L-BFGS.  Sample i
    stops when ‖∇f_i‖ ≤ max(gtol, rtol·‖∇f_i(x0_i)‖) (CONVERGED), after ``maxiter``
    iterations (MAXITER), when its line search fails (LINESEARCH_FAILED) or when f_i or
    ∇f_i is not finite at x0_i (NONFINITE); the others go on.

    ``value_and_grad(x)`` → (f, ∇f) replaces the two calls by one fused evaluation;
    ``rows_value_and_grad(X_rows, rows)`` → ((r,), (r, n)), for a (B, n) x0, evaluates only
    the samples ``rows`` (host indices) at ``X_rows``, so rounds skip samples not searching.
    ``callback(k, x, f, grad_norm)`` runs after every iteration in which a sample accepted a
    step (x shaped as x0; f, grad_norm floats for a 1-D x0, else host (B,) arrays).  Arrays
    stay in x0's namespace and on its device.
    """
    require(0 < c1 < c2 < 1, "0 < c1 < c2 < 1", c1=c1, c2=c2)
    require(memory >= 1, "memory >= 1", memory=memory)
    require(maxiter >= 0, "maxiter >= 0", maxiter=maxiter)
    ev = RowEvaluator(x0, fun, grad, value_and_grad=value_and_grad,
                      rows_value_and_grad=rows_value_and_grad)
    X, xp, bsz = ev.X0, ev.xp, ev.bsz
    F, G, gg = ev.evaluate(X, np.ones(bsz, dtype=bool))
    gnorm = np.sqrt(gg)
    mem = LBFGSMemory(ev, X, memory)
    log = SampleLog(F, gnorm, gtol, rtol)

    search = dict(c1=c1, c2=c2, max_trials=max_linesearch)
    for k in range(maxiter + 1):
        log.stop_converged(k, F, gnorm)
        iterating = log.running.copy()
        if k == maxiter or not np.count_nonzero(iterating):
            break
        P = mem.direction(G, iterating)
        slope = ev.host(rowdot(xp, G, P))
        alpha = choose(mem.count > 0, 1.0, first_step(gnorm))
        uphill = iterating & ~(slope < 0)  # not a descent direction: drop the memory
        mem.forget(uphill)
        P, slope, alpha = steepest_descent(ev, uphill, G, gnorm, P, slope, alpha)
        remembers = mem.count > 0
        ok, Xn, Gn, Fn = search_rows(ev, X, G, F, P, slope, alpha, iterating, **search)
        retry = iterating & ~ok & remembers
        if np.count_nonzero(retry):  # drop the memory and try steepest descent once
            mem.forget(retry)
            P, slope, alpha = steepest_descent(ev, retry, G, gnorm, P, slope, alpha)
            ok2, Xr, Gr, Fr = search_rows(ev, X, G, F, P, slope, alpha, retry, **search)
            Xn, Gn, Fn = ev.select(ok2, Xr, Xn), ev.select(ok2, Gr, Gn), choose(ok2, Fr, Fn)
            ok = ok | ok2
        log.stop(iterating & ~ok, MinimizeStatus.LINESEARCH_FAILED, k,
                 "line search found no step with sufficient decrease at iteration {k} "
                 "(‖∇f‖ = {g:.3e}, tolerance {tol:.3e})", F, gnorm)
        S, Ydiff = Xn - X, Gn - G
        sy_dev = rowdot(xp, S, Ydiff)
        X, G = ev.select(ok, Xn, X), ev.select(ok, Gn, G)
        sy, gg = ev.host(xp.concat([sy_dev, rowdot(xp, G, G)])).reshape(2, -1)  # one transfer
        push = ok & (sy > 0)
        if np.count_nonzero(push) == bsz:
            mem.push(push, S, Ydiff, 1.0 / sy_dev, stopped=~iterating)
        elif np.count_nonzero(push):
            rho = 1.0 / ev.select(push, sy_dev, xp.ones_like(sy_dev))
            mem.push(push, S, Ydiff, rho, stopped=~iterating)
        F = choose(ok, Fn, F)
        gnorm = choose(ok, np.sqrt(gg), gnorm)
        log.record(ok, F)
        if callback is not None and np.count_nonzero(ok):
            if ev.single:
                callback(k + 1, X[0, :], float(F[0]), float(gnorm[0]))
            else:
                callback(k + 1, X, F.copy(), gnorm.copy())
    return log.result(maxiter, X, F, gnorm, ev, np.zeros(bsz, dtype=np.int64))


def first_step(gnorm: np.ndarray) -> np.ndarray:
    """The first trial step without a memory: min(1, 1/‖∇f‖)."""
    return np.minimum(1.0, 1.0 / np.where(gnorm > 0, gnorm, 1.0))


def steepest_descent(
    ev: RowEvaluator, which: np.ndarray, G: Any, gnorm: np.ndarray, P: Any,
    slope: np.ndarray, alpha: np.ndarray,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """(P, slope, first step) with the rows ``which`` turned to −∇f, slope −‖∇f‖² and
    first step min(1, 1/‖∇f‖)."""
    if not np.count_nonzero(which):
        return P, slope, alpha
    return (ev.select(which, -G, P), choose(which, -gnorm * gnorm, slope),
            choose(which, first_step(gnorm), alpha))
