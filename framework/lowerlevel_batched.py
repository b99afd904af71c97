"""B independent L-BFGS runs advanced together: ``lbfgs_batched(fun, grad, X0)``.

``fun(X)`` → (B,) and ``grad(X)`` → (B, n) evaluate all rows at once (one pass); row i is
sample i's iterate.  Each sample follows exactly the rules of ``framework.lowerlevel``:
its own two-loop recursion (batched inner products, per-sample memory of at most
``memory`` pairs, H₀ from its newest pair), its own strong-Wolfe line search (bracketing,
then zoom; Armijo never accepts an increase; the same fallbacks and steepest-descent
retry) and its own stopping test.  The line search of every sample is the coroutine
``framework.lowerlevel.strong_wolfe_search`` that ``lbfgs`` drives too, so each sample
makes the same choices as ``lbfgs`` run on it alone, up to round-off in the batched
inner products.

Every round of the batched line search evaluates the rows at X + diag(α) P, with α_i = 0
for samples that are not searching (already accepted, converged or stopped), whose rows
never change.  With ``rows_value_and_grad`` only the searching samples' rows are
gathered and evaluated (a batch shrinks as its samples converge); otherwise all B rows
are evaluated and the others ignored.
Host transfers (counted in ``host_reads``): one per line-search round (f and the slopes
∇fᵀp, 2B values) and two per iteration (the slopes of the new direction; the inner
products sᵀy with the gradient norms); with
``rows_value_and_grad`` the indices of the searching samples go to the device when they
are not all of them (at most B integers).  The two-loop recursion stays on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from backends.host import to_host
from framework.lowerlevel import (
    LowerLevelStatus,
    WolfeSearch,
    check_lbfgs_options,
    strong_wolfe_search,
)


@dataclass(frozen=True)
class BatchedLowerLevelResult:
    """Outcome of ``lbfgs_batched``; per-sample fields are tuples of length B.

    ``f_evals``/``grad_evals`` count batched calls of ``fun``/``grad`` (each evaluates B
    rows); ``sample_f_evals`` counts, per sample, the evaluations it used (the figure the
    unbatched ``lbfgs`` reports as ``f_evals``); ``host_reads`` counts the transfers of
    per-sample scalars to the host (each a synchronisation on a GPU).
    """

    X: Any
    converged: tuple[bool, ...]
    status: tuple[LowerLevelStatus, ...]
    message: tuple[str, ...]
    iterations: tuple[int, ...]
    grad_norm: tuple[float, ...]
    f: tuple[float, ...]
    f_evals: int
    grad_evals: int
    sample_f_evals: tuple[int, ...]
    host_reads: int = 0

    @property
    def all_converged(self) -> bool:
        return all(self.converged)


def _rowdot(xp: Any, a: Any, b: Any) -> Any:
    return xp.linalg.vecdot(a, b, axis=-1)


class _Runner:
    """Shared state of the B runs: evaluation counts and the batched line search."""

    def __init__(
        self,
        fun: Callable[[Any], Any],
        grad: Callable[[Any], Any],
        X0: Any,
        value_and_grad: Callable[[Any], tuple[Any, Any]] | None = None,
        rows_value_and_grad: Callable[[Any, np.ndarray], tuple[Any, Any]] | None = None,
    ) -> None:
        self.fun, self.grad = fun, grad
        self.value_and_grad = value_and_grad
        self.rows_value_and_grad = rows_value_and_grad
        self.xp = array_api_compat.array_namespace(X0)
        self.device = array_api_compat.device(X0)
        self.bsz = int(X0.shape[0])
        self.f_evals = 0
        self.host_reads = 0
        self.sample_evals = np.zeros(self.bsz, dtype=np.int64)

    def host(self, a: Any) -> np.ndarray:
        """(B,) or fewer device values to the host as float64: the documented, counted
        transfer (a synchronisation on a GPU)."""
        self.host_reads += 1
        return np.asarray(to_host(a), dtype=np.float64)

    def mask(self, host_mask: np.ndarray) -> Any:
        """A host (B,) bool mask as a (B, 1) device mask."""
        return self.xp.asarray(host_mask[:, None], device=self.device)

    def evaluate(
        self, X: Any, used: np.ndarray, D: Any = None
    ) -> tuple[np.ndarray, Any, np.ndarray]:
        """(f (B,) and ∇fᵀd (B,) on the host, ∇f (B, n)) in one host transfer, with d the
        rows of ``D`` (∇f itself when None); rows not ``used`` may hold anything."""
        self.f_evals += 1
        self.sample_evals += used
        if self.rows_value_and_grad is not None:
            return self._evaluate_rows(X, np.flatnonzero(used), D)
        if self.value_and_grad is not None:
            F, G = self.value_and_grad(X)
        else:
            F, G = self.fun(X), self.grad(X)
        both = self._values_and_dots(F, G, G if D is None else D)
        return both[0], G, both[1]

    def _values_and_dots(self, F: Any, G: Any, D: Any) -> np.ndarray:
        """(2, r) host array [f; ∇fᵀd]: one transfer."""
        xp = self.xp
        return self.host(xp.stack([xp.astype(F, G.dtype), _rowdot(xp, G, D)]))

    def _evaluate_rows(
        self, X: Any, rows: np.ndarray, D: Any
    ) -> tuple[np.ndarray, Any, np.ndarray]:
        """Evaluate the samples ``rows`` only; the others get f = ∇fᵀd = 0 and ∇f = 0."""
        xp, bsz = self.xp, self.bsz
        if len(rows) == bsz:
            F, G = self.rows_value_and_grad(X, rows)
            both = self._values_and_dots(F, G, G if D is None else D)
            return both[0], G, both[1]
        index = xp.asarray(rows, dtype=xp.int64, device=self.device)
        Fr, Gr = self.rows_value_and_grad(xp.take(X, index, axis=0), rows)
        both = self._values_and_dots(Fr, Gr, Gr if D is None else xp.take(D, index, axis=0))
        F, dots = np.zeros(bsz), np.zeros(bsz)
        F[rows], dots[rows] = both[0], both[1]
        # scatter by a gather: row i of the result is row where[i] of [Gr; 0]
        where = np.full(bsz, len(rows))
        where[rows] = np.arange(len(rows))
        padded = xp.concat([Gr, xp.zeros((1, Gr.shape[1]), dtype=Gr.dtype, device=self.device)])
        G = xp.take(padded, xp.asarray(where, dtype=xp.int64, device=self.device), axis=0)
        return F, G, dots

    def line_search(
        self, X: Any, G: Any, F: np.ndarray, P: Any, slope: np.ndarray, alpha0: np.ndarray,
        which: np.ndarray, c1: float, c2: float, max_trials: int,
    ) -> tuple[np.ndarray, Any, Any, np.ndarray]:
        """Run the searches of the samples in ``which`` together.

        Returns (accepted mask, X_new, G_new, F_new): rows not accepted keep X, G, F.
        """
        xp, bsz = self.xp, self.bsz
        searches: dict[int, WolfeSearch] = {}
        alpha = np.zeros(bsz)
        for i in np.flatnonzero(which):
            gen = strong_wolfe_search(
                float(F[i]), float(slope[i]), float(alpha0[i]), c1, c2, max_trials
            )
            searches[int(i)] = gen
            _, alpha[i] = next(gen)
        accepted = np.zeros(bsz, dtype=bool)
        Xa, Ga, Fa = X, G, F.copy()
        Xk, Gk, Fk = X, G, F.copy()
        while searches:
            pending = np.zeros(bsz, dtype=bool)
            pending[list(searches)] = True
            alpha_dev = xp.asarray(np.where(pending, alpha, 0.0)[:, None], dtype=X.dtype,
                                   device=self.device)
            Xt = X + alpha_dev * P
            Ft, Gt, st = self.evaluate(Xt, pending, P)
            keep = np.zeros(bsz, dtype=bool)
            take_last = np.zeros(bsz, dtype=bool)
            take_kept = np.zeros(bsz, dtype=bool)
            for i in list(searches):
                fi = float(Ft[i])
                si = float(st[i]) if math.isfinite(fi) else math.nan
                try:
                    keep[i], alpha[i] = searches[i].send((fi, si))
                except StopIteration as stop:
                    outcome = stop.value[0]
                    del searches[i]
                    take_last[i] = outcome == "last"
                    take_kept[i] = outcome == "kept"
            if take_kept.any():
                m = self.mask(take_kept)
                Xa, Ga = xp.where(m, Xk, Xa), xp.where(m, Gk, Ga)
                Fa = np.where(take_kept, Fk, Fa)
            if take_last.any():
                m = self.mask(take_last)
                Xa, Ga = xp.where(m, Xt, Xa), xp.where(m, Gt, Ga)
                Fa = np.where(take_last, Ft, Fa)
            if keep.any():
                m = self.mask(keep)
                Xk, Gk = xp.where(m, Xt, Xk), xp.where(m, Gt, Gk)
                Fk = np.where(keep, Ft, Fk)
            accepted |= take_last | take_kept
        return accepted, Xa, Ga, Fa


class _Memory:
    """Per-sample L-BFGS pairs, newest first; rho = 0 marks an empty slot (a no-op)."""

    def __init__(self, xp: Any, X: Any, memory: int) -> None:
        self.xp = xp
        zeros = xp.zeros_like(X)
        self.S = [zeros] * memory
        self.Y = [zeros] * memory
        dev = array_api_compat.device(X)
        self.rho = [xp.zeros((X.shape[0],), dtype=X.dtype, device=dev)] * memory
        self.count = np.zeros(X.shape[0], dtype=np.int64)

    def push(self, mask_dev: Any, mask: np.ndarray, s: Any, y: Any, rho: Any,
             dead: np.ndarray | None = None) -> None:
        """Prepend (s_i, y_i, rho_i) for the samples in ``mask``.

        ``dead`` marks samples whose memory is never read again (stopped): when every
        other sample pushes, the slots rotate without copies and the dead rows get an
        empty newest slot (rho = 0) instead of keeping theirs.
        """
        xp = self.xp
        m1 = mask_dev[:, 0]
        if dead is not None and bool(np.all(mask | dead)):
            self.S = [s, *self.S[:-1]]
            self.Y = [y, *self.Y[:-1]]
            self.rho = [xp.where(m1, rho, xp.zeros_like(rho)), *self.rho[:-1]]
            self.count = np.where(mask, np.minimum(self.count + 1, len(self.S)), self.count)
            return
        for a in range(len(self.S) - 1, 0, -1):
            self.S[a] = xp.where(mask_dev, self.S[a - 1], self.S[a])
            self.Y[a] = xp.where(mask_dev, self.Y[a - 1], self.Y[a])
            self.rho[a] = xp.where(m1, self.rho[a - 1], self.rho[a])
        self.S[0] = xp.where(mask_dev, s, self.S[0])
        self.Y[0] = xp.where(mask_dev, y, self.Y[0])
        self.rho[0] = xp.where(m1, rho, self.rho[0])
        self.count = np.where(mask, np.minimum(self.count + 1, len(self.S)), self.count)

    def forget(self, mask_dev: Any, mask: np.ndarray) -> None:
        xp = self.xp
        m1 = mask_dev[:, 0]
        self.rho = [xp.where(m1, xp.zeros_like(r), r) for r in self.rho]
        self.count = np.where(mask, 0, self.count)

    def direction(self, G: Any) -> Any:
        """−H_k g per row by the two-loop recursion (H₀ = sᵀy / yᵀy from the newest pair)."""
        xp = self.xp
        q = G
        alphas = []
        for s, y, rho in zip(self.S, self.Y, self.rho, strict=True):
            a = rho * _rowdot(xp, s, q)
            alphas.append(a)
            q = q - a[:, None] * y
        has = self.rho[0] != 0
        yy = _rowdot(xp, self.Y[0], self.Y[0])
        denom = xp.where(has, self.rho[0] * yy, xp.ones_like(yy))
        q = xp.where(has[:, None], (1.0 / denom)[:, None] * q, q)
        for s, y, rho, a in zip(
            reversed(self.S), reversed(self.Y), reversed(self.rho), reversed(alphas), strict=True
        ):
            b = rho * _rowdot(xp, y, q)
            q = q + (a - b)[:, None] * s
        return -q


def lbfgs_batched(
    fun: Callable[[Any], Any],
    grad: Callable[[Any], Any],
    X0: Any,
    *,
    gtol: float = 1e-8,
    rtol: float = 0.0,
    maxiter: int = 1000,
    memory: int = 10,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_linesearch: int = 40,
    value_and_grad: Callable[[Any], tuple[Any, Any]] | None = None,
    rows_value_and_grad: Callable[[Any, np.ndarray], tuple[Any, Any]] | None = None,
) -> BatchedLowerLevelResult:
    """Minimise the B row problems from the rows of ``X0`` (B, n) together.

    ``value_and_grad(X)`` → ((B,), (B, n)), when given, replaces the separate calls.
    ``rows_value_and_grad(X_rows, rows)`` → ((r,), (r, n)), when given, replaces both:
    it evaluates the samples ``rows`` (a host index array of length r) at their iterates
    ``X_rows`` (r, n), so evaluations skip the samples that are not searching.

    Sample i stops when ‖∇f_i‖ ≤ max(gtol, rtol·‖∇f_i(x0_i)‖) (CONVERGED), after
    ``maxiter`` iterations (MAXITER), when its line search fails (LINESEARCH_FAILED) or
    when f_i or ∇f_i is not finite at x0_i (NONFINITE); the others go on, and a stopped
    sample's row no longer changes.  Arrays stay in X0's namespace and on its device.
    """
    check_lbfgs_options(c1=c1, c2=c2, memory=memory, maxiter=maxiter)
    if X0.ndim != 2:
        raise ValueError(f"X0 has shape {tuple(X0.shape)}; expected (B, n)")
    run = _Runner(fun, grad, X0, value_and_grad, rows_value_and_grad)
    xp, bsz = run.xp, run.bsz
    X = X0
    F, G, gg = run.evaluate(X, np.ones(bsz, dtype=bool))
    gnorm = np.sqrt(gg)
    tol = np.maximum(gtol, rtol * gnorm)
    mem = _Memory(xp, X, memory)
    status: list[LowerLevelStatus | None] = [None] * bsz
    message = [""] * bsz
    iterations = np.zeros(bsz, dtype=np.int64)
    for i in np.flatnonzero(~(np.isfinite(F) & np.isfinite(gnorm))):
        status[i] = LowerLevelStatus.NONFINITE
        message[i] = f"f or ∇f is not finite at x0 (f={F[i]})"

    def active() -> np.ndarray:
        return np.array([s is None for s in status])

    def mark_converged(k: int) -> None:
        for i in np.flatnonzero(active() & (gnorm <= tol)):
            status[i] = LowerLevelStatus.CONVERGED
            message[i] = f"‖∇f‖ = {gnorm[i]:.3e} ≤ {tol[i]:.3e}"
            iterations[i] = k

    for k in range(maxiter):
        mark_converged(k)
        act = active()
        if not act.any():
            break
        P = mem.direction(G)
        slope = run.host(_rowdot(xp, G, P))
        bad = act & ~(slope < 0)  # not a descent direction: steepest descent
        if bad.any():
            m = run.mask(bad)
            mem.forget(m, bad)
            P = xp.where(m, -G, P)
            slope = np.where(bad, -gnorm * gnorm, slope)
        first_step = np.minimum(1.0, 1.0 / np.where(gnorm > 0, gnorm, 1.0))
        alpha0 = np.where(mem.count > 0, 1.0, first_step)
        ok, Xn, Gn, Fn = run.line_search(X, G, F, P, slope, alpha0, act, c1, c2, max_linesearch)
        retry = act & ~ok & (mem.count > 0)
        if retry.any():  # drop the memory and try steepest descent once
            m = run.mask(retry)
            mem.forget(m, retry)
            P = xp.where(m, -G, P)
            slope = np.where(retry, -gnorm * gnorm, slope)
            ok2, Xr, Gr, Fr = run.line_search(
                X, G, F, P, slope, first_step, retry, c1, c2, max_linesearch
            )
            m2 = run.mask(ok2)
            Xn, Gn, Fn = xp.where(m2, Xr, Xn), xp.where(m2, Gr, Gn), np.where(ok2, Fr, Fn)
            ok = ok | ok2
        for i in np.flatnonzero(act & ~ok):
            status[i] = LowerLevelStatus.LINESEARCH_FAILED
            message[i] = (
                f"line search found no step with sufficient decrease at iteration {k} "
                f"(‖∇f‖ = {gnorm[i]:.3e}, tolerance {tol[i]:.3e})"
            )
            iterations[i] = k
        okd = run.mask(ok)
        S, Yd = Xn - X, Gn - G
        sy_dev = _rowdot(xp, S, Yd)
        X, G = xp.where(okd, Xn, X), xp.where(okd, Gn, G)
        sy, gg = run.host(xp.stack([sy_dev, _rowdot(xp, G, G)]))  # one transfer
        push = ok & (sy > 0)
        if push.any():
            safe = xp.where(okd[:, 0], sy_dev, xp.ones_like(sy_dev))
            mem.push(run.mask(push), push, S, Yd, 1.0 / safe, dead=~act)
        F = np.where(ok, Fn, F)
        gnorm = np.where(ok, np.sqrt(gg), gnorm)
    else:
        mark_converged(maxiter)
    for i in np.flatnonzero(active()):
        status[i] = LowerLevelStatus.MAXITER
        message[i] = f"reached maxiter={maxiter} with ‖∇f‖ = {gnorm[i]:.3e} > {tol[i]:.3e}"
        iterations[i] = maxiter
    final = [s if s is not None else LowerLevelStatus.MAXITER for s in status]
    return BatchedLowerLevelResult(
        X=X,
        converged=tuple(s is LowerLevelStatus.CONVERGED for s in final),
        status=tuple(final),
        message=tuple(message),
        iterations=tuple(int(i) for i in iterations),
        grad_norm=tuple(float(g) for g in gnorm),
        f=tuple(float(f) for f in F),
        f_evals=run.f_evals,
        grad_evals=run.f_evals,
        sample_f_evals=tuple(int(e) for e in run.sample_evals),
        host_reads=run.host_reads,
    )
