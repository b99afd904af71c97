"""L-BFGS for B independent problems min_x f_i(x) advanced together (B = 1 for a 1-D x0).

With x0 of shape (B, n), ``fun(X)`` → (B,) and ``grad(X)`` → (B, n) evaluate all rows at
once; with x0 of shape (n,) they take and return one sample's arrays and the result is
unwrapped.  Every sample has its own memory, strong-Wolfe line search (when it fails, the
memory is dropped and steepest descent tried once) and stopping test; a stopped sample's
row no longer changes.  A sample's arithmetic does not depend on B.

Host transfers (``host_reads``): one per evaluation round (f and the slopes ∇fᵀp) and two
per iteration (the new direction's slopes; sᵀy with ‖∇f‖²).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from backends.kernels import rowdot
from framework.optim.line_search import search_rows, strong_wolfe_search
from framework.optim.outcome import MinimizeResult, MinimizeStatus, SampleLog, require
from framework.optim.rows import RowEvaluator, RowsValueAndGrad, ValueAndGrad, choose


def lbfgs(
    fun: Callable[[Any], Any], grad: Callable[[Any], Any], x0: Any, *, gtol: float = 1e-8,
    rtol: float = 0.0, maxiter: int = 1000, memory: int = 10, c1: float = 1e-4,
    c2: float = 0.9, max_linesearch: int = 40,
    callback: Callable[[int, Any, Any, Any], None] | None = None,
    value_and_grad: ValueAndGrad | None = None,
    rows_value_and_grad: RowsValueAndGrad | None = None,
) -> MinimizeResult:
    """Minimise ``fun`` from ``x0`` ((n,) or (B, n), a warm start) by L-BFGS.  Sample i
    stops when ‖∇f_i‖ ≤ max(gtol, rtol·‖∇f_i(x0_i)‖) (CONVERGED), after ``maxiter``
    iterations (MAXITER), when its line search fails (LINESEARCH_FAILED) or when f_i or
    ∇f_i is not finite at x0_i (NONFINITE); the others go on.

    ``value_and_grad(x)`` → (f, ∇f) fuses the two calls; ``rows_value_and_grad(X_rows,
    rows)`` → ((r,), (r, n)), for a (B, n) x0, evaluates only the samples ``rows`` (host
    indices), so rounds skip samples not searching.  ``callback(k, x, f, grad_norm)`` runs
    after every iteration in which a sample accepted a step (x shaped as x0; f, grad_norm
    floats for a 1-D x0, else host (B,) arrays).
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

    search = partial(strong_wolfe_search, c1=c1, c2=c2, max_trials=max_linesearch)
    for k, iterating in log.iterate(maxiter):
        P = mem.direction(G, iterating)
        slope = ev.host(rowdot(xp, G, P))
        alpha = choose(mem.count > 0, 1.0, first_step(gnorm))
        uphill = iterating & ~(slope < 0)  # not a descent direction: drop the memory
        mem.forget(uphill)
        P, slope, alpha = steepest_descent(ev, uphill, G, gnorm, P, slope, alpha)
        remembers = mem.count > 0
        ok, Xn, Gn, Fn = search_rows(ev, X, G, F, P, slope, alpha, iterating, search)
        retry = iterating & ~ok & remembers
        if np.count_nonzero(retry):  # drop the memory and try steepest descent once
            mem.forget(retry)
            P, slope, alpha = steepest_descent(ev, retry, G, gnorm, P, slope, alpha)
            ok2, Xr, Gr, Fr = search_rows(ev, X, G, F, P, slope, alpha, retry, search)
            Xn, Gn, Fn = ev.select(ok2, Xr, Xn), ev.select(ok2, Gr, Gn), choose(ok2, Fr, Fn)
            ok = ok | ok2
        log.stop(iterating & ~ok, MinimizeStatus.LINESEARCH_FAILED, k,
                 "line search found no step with sufficient decrease at iteration {k} "
                 "(‖∇f‖ = {g:.3e}, tolerance {tol:.3e})")
        S, Ydiff = Xn - X, Gn - G
        sy_dev = rowdot(xp, S, Ydiff)
        X, G = ev.select(ok, Xn, X), ev.select(ok, Gn, G)
        sy, gg = ev.host(xp.concat([sy_dev, rowdot(xp, G, G)])).reshape(2, -1)  # one transfer
        mem.push(ok & (sy > 0), S, Ydiff, sy_dev, stopped=~iterating)
        F, gnorm = log.record(ok, Fn, np.sqrt(gg))
        if callback is not None and np.count_nonzero(ok):
            if ev.single:
                callback(k + 1, X[0, :], float(F[0]), float(gnorm[0]))
            else:
                callback(k + 1, X, F.copy(), gnorm.copy())
    return log.result(maxiter, X, ev, np.zeros(bsz, dtype=np.int64))


def first_step(gnorm: np.ndarray) -> np.ndarray:
    """min(1, 1/‖∇f‖): the first trial step without a memory."""
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


class LBFGSMemory:
    """Per-sample L-BFGS memories of a batch: at most ``size`` pairs per sample, ``count[i]``
    of sample i.  Slot a holds the a-th newest pair (s, y, ρ = 1/sᵀy) of every sample as rows
    of (B, n) arrays and a (B,) array; ρ = 0 marks an empty slot (the recursion passes it
    unchanged; a sample with pairs has ρ ≠ 0 in its newest).  The recursion runs over as
    many slots as the fullest memory among the samples iterating, so a sample's arithmetic
    is the same alone as in a batch."""

    def __init__(self, ev: RowEvaluator, X: Any, size: int) -> None:
        self.ev, self.xp = ev, ev.xp
        zeros = self.xp.zeros_like(X)
        self.S = [zeros] * size
        self.Y = [zeros] * size
        self.rho = [self.xp.zeros((X.shape[0],), dtype=X.dtype, device=ev.device)] * size
        self.count = np.zeros(X.shape[0], dtype=np.int64)

    def push(self, mask: np.ndarray, s: Any, y: Any, sy: Any, stopped: np.ndarray) -> None:
        """Prepend (s_i, y_i, ρ_i = 1/s_iᵀy_i) for the samples in the host mask ``mask``.
        ``stopped`` marks samples whose memory is never read again: when every other sample
        pushes, the slots rotate without copies and the stopped rows get an empty memory."""
        xp, select, size, pushing = self.xp, self.ev.select, len(self.S), np.count_nonzero(mask)
        if not pushing:
            return
        rho = 1.0 / (sy if pushing == len(mask) else select(mask, sy, xp.ones_like(sy)))
        if np.count_nonzero(mask | stopped) == len(mask):
            self.S = [s, *self.S[:-1]]
            self.Y = [y, *self.Y[:-1]]
            self.rho = [select(mask, rho, xp.zeros_like(rho)), *self.rho[:-1]]
            self.count = np.where(mask, np.minimum(self.count + 1, size), 0)
            return
        # slots at or beyond a sample's count are empty: shift only the used ones
        used = min(int(self.count[mask].max()) + 1, size)
        for slots, new in ((self.S, s), (self.Y, y), (self.rho, rho)):
            for a in range(used - 1, 0, -1):
                slots[a] = select(mask, slots[a - 1], slots[a])
            slots[0] = select(mask, new, slots[0])
        self.count = np.where(mask, np.minimum(self.count + 1, size), self.count)

    def forget(self, mask: np.ndarray) -> None:
        if not np.count_nonzero(mask):
            return
        used = int(self.count.max())
        zero = self.xp.zeros_like(self.rho[0])
        self.rho[:used] = [self.ev.select(mask, zero, r) for r in self.rho[:used]]
        self.count = np.where(mask, 0, self.count)

    def direction(self, G: Any, iterating: np.ndarray) -> Any:
        """−H g for every row by the two-loop recursion, H₀ = (sᵀy / yᵀy) I from the
        sample's newest pair (the identity without pairs); rows of samples not
        ``iterating`` are not meaningful."""
        xp = self.xp
        used = int(self.count[iterating].max()) if np.count_nonzero(iterating) else 0
        q = G
        alphas = []
        for s, y, rho in zip(self.S[:used], self.Y[:used], self.rho[:used], strict=True):
            a = rho * rowdot(xp, s, q)
            alphas.append(a)
            q = q - a[:, None] * y
        if used:
            rho0, yy = self.rho[0], rowdot(xp, self.Y[0], self.Y[0])
            if np.count_nonzero(self.count) < len(self.count):  # some rows have no pairs
                empty = rho0 == 0
                rho0 = xp.where(empty, xp.ones_like(rho0), rho0)
                yy = xp.where(empty, xp.ones_like(yy), yy)
            q = (1.0 / (rho0 * yy))[:, None] * q
        for s, y, rho, a in zip(reversed(self.S[:used]), reversed(self.Y[:used]),
                                reversed(self.rho[:used]), reversed(alphas), strict=True):
            b = rho * rowdot(xp, y, q)
            q = q + (a - b)[:, None] * s
        return -q
