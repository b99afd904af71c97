"""L-BFGS for B independent problems min_x f_i(x) advanced together (B = 1 for a 1-D x0).

With x0 of shape (B, n), ``fun(X)`` → (B,) and ``grad(X)`` → (B, n) evaluate all rows at
once; with x0 of shape (n,) they take and return one sample's arrays and the result is
unwrapped.  Every sample has its own memory (``framework.optim.memory``), strong-Wolfe line
search (``framework.optim.line_search``; when no step gives sufficient decrease the memory
is dropped and steepest descent is tried once) and stopping test; a stopped sample's row
no longer changes.  A sample's arithmetic does not depend on B, so B samples solved
together take the iterations and evaluations each takes alone.

Host transfers (counted in ``host_reads``): one per evaluation round (f with the slopes
∇fᵀp, 2B values) and two per iteration (the slopes of the new direction; sᵀy with the
gradient norms); with ``rows_value_and_grad`` the indices of the searching samples go
to the device when they are not all of them.  The two-loop recursion stays on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from framework.optim.line_search import search_rows
from framework.optim.memory import LBFGSMemory
from framework.optim.outcome import MinimizeResult, MinimizeStatus, SampleLog
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
    """Minimise ``fun`` from ``x0`` (warm start; (n,) or (B, n)) with L-BFGS.  Sample i
    stops when ‖∇f_i‖ ≤ max(gtol, rtol·‖∇f_i(x0_i)‖) (CONVERGED), after ``maxiter``
    iterations (MAXITER), when its line search fails (LINESEARCH_FAILED) or when f_i or
    ∇f_i is not finite at x0_i (NONFINITE); the others go on.

    ``value_and_grad(x)`` → (f, ∇f), when given, replaces the two calls (a fused
    evaluation shares their work).  ``rows_value_and_grad(X_rows, rows)`` → ((r,),
    (r, n)), for a (B, n) x0, replaces both: it evaluates the samples ``rows`` (a host
    index array of length r) at their iterates ``X_rows``, so evaluations skip the
    samples that are not searching.  ``callback(k, x, f, grad_norm)`` runs after every
    iteration in which a sample accepted a step (x as x0 is shaped; f and grad_norm
    floats for a 1-D x0, else host (B,) arrays).  Arrays stay in x0's namespace and on
    its device.
    """
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"need 0 < c1 < c2 < 1; got c1={c1!r}, c2={c2!r}")
    if memory < 1:
        raise ValueError(f"memory must be positive; got memory={memory!r}")
    if maxiter < 0:
        raise ValueError(f"maxiter must be non-negative; got maxiter={maxiter!r}")
    ev = RowEvaluator(x0, fun, grad, value_and_grad=value_and_grad,
                      rows_value_and_grad=rows_value_and_grad)
    X, xp, bsz = ev.X0, ev.xp, ev.bsz
    F, G, gg = ev.evaluate(X, np.ones(bsz, dtype=bool))
    gnorm = np.sqrt(gg)
    mem = LBFGSMemory(ev, X, memory)
    log = SampleLog(F, gnorm, gtol, rtol)

    def steepest_descent(which: np.ndarray, P: Any, slope: np.ndarray) -> tuple[Any, Any]:
        mem.forget(which)
        return ev.select(which, -G, P), choose(which, -gnorm * gnorm, slope)

    search = dict(c1=c1, c2=c2, max_trials=max_linesearch)
    for k in range(maxiter):
        log.stop_converged(k, F, gnorm)
        iterating = log.running.copy()
        if not np.count_nonzero(iterating):
            break
        P = mem.direction(G, iterating)
        slope = ev.host(rowdot(xp, G, P))
        if np.count_nonzero(slope < 0) < bsz:  # not a descent direction: steepest descent
            P, slope = steepest_descent(iterating & ~(slope < 0), P, slope)
        remembers = mem.count > 0
        alpha0 = (np.ones(bsz) if np.count_nonzero(remembers) == bsz
                  else choose(remembers, 1.0, first_step(gnorm)))
        ok, Xn, Gn, Fn = search_rows(ev, X, G, F, P, slope, alpha0, iterating, **search)
        retry = iterating & ~ok & remembers
        if np.count_nonzero(retry):  # drop the memory and try steepest descent once
            P, slope = steepest_descent(retry, P, slope)
            ok2, Xr, Gr, Fr = search_rows(ev, X, G, F, P, slope, first_step(gnorm), retry,
                                          **search)
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
    else:
        log.stop_converged(maxiter, F, gnorm)
    return log.result(maxiter, X, F, gnorm, ev, np.zeros(bsz, dtype=np.int64))


def first_step(gnorm: np.ndarray) -> np.ndarray:
    """The first trial step without a memory: min(1, 1/‖∇f‖)."""
    return np.minimum(1.0, 1.0 / np.where(gnorm > 0, gnorm, 1.0))
